"""Image-edit bodies read into the one schema (server/request_schema.ImageEditRequest): the
OpenAI multipart form of POST /v1/images/edits (and of POST /v1/jobs), and the JSON job body
whose images are base64 members. Files are counted and typed here; what they hold is decided
from their bytes by server/inputs.py, in the service."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from server import errors
from server.http.forms import read_form
from server.inputs import MAX_IMAGES
from server.request_schema import LAX, ImageEditRequest, base64_image

# The OpenAI SDK sends one image as `image` and a list as repeated `image[]` (its "brackets"
# array format); the LiteLLM proxy forwards `mask[]` too.
IMAGE_FIELDS = ("image", "image[]")
MASK_FIELDS = ("mask", "mask[]")
# Form fields besides files: every schema field, with room for a client's unknown ones to be
# refused by name (rather than by the parser's count).
MAX_FORM_FIELDS = 64
FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})


def _form_schema() -> dict[str, Any]:
    """The OpenAPI schema of the edits form: the schema's fields, and the files."""
    schema = ImageEditRequest.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {
        "image": {
            "anyOf": [binary, {"type": "array", "items": binary, "maxItems": MAX_IMAGES}],
            "description": "The image(s) to edit: `image`, or repeated `image[]` (PNG, JPEG, "
            "WebP, GIF or BMP; the type is read from the bytes)",
        },
        "mask": {
            **binary,
            "description": "Fully transparent pixels (alpha 0) mark the area to edit, on the "
            "first image; without a mask, the first image's own transparency",
        },
        **schema["properties"],
        "loras": {"type": "string", "description": 'JSON text: [{"name": ..., "weight": ...}]'},
    }
    schema["required"] = ["image", "prompt"]
    return schema


def _job_schema() -> dict[str, Any]:
    """The OpenAPI schema of a JSON job: the schema's fields, and base64 images."""
    schema = ImageEditRequest.model_json_schema()
    text = {"type": "string", "description": "base64, raw or as a data: URL"}
    schema["properties"] = {
        "image": {"anyOf": [text, {"type": "array", "items": text, "maxItems": MAX_IMAGES}]},
        "mask": {**text, "description": "base64; transparent pixels mark the area to edit"},
        **schema["properties"],
    }
    return schema


EDIT_FORM_SCHEMA = _form_schema()
JOB_JSON_SCHEMA = _job_schema()


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_edit_form(request: Request) -> ImageEditRequest:
    """The multipart edits body. Every value arrives as text ("2", "0.5", "true") and is
    read laxly; an empty value means "not given" (the SDK's None)."""
    form = await read_form(
        request,
        max_files=MAX_IMAGES + 1,
        max_fields=MAX_FORM_FIELDS,
        param="image",
        bounds=f"at most {MAX_IMAGES} images and one mask per request",
    )
    try:
        return await edit_from_form(form)
    finally:
        await form.close()


async def edit_from_form(form: FormData) -> ImageEditRequest:
    images: list[bytes] = []
    masks: list[bytes] = []
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if name in IMAGE_FIELDS or name in MASK_FIELDS:
            param = name.removesuffix("[]")
            if not isinstance(value, UploadFile):
                if not value:
                    continue
                raise errors.InvalidRequestError(
                    f"{param} must be a file part of the multipart form (an image file), not "
                    "a text field",
                    param=param,
                )
            (images if param == "image" else masks).append(await value.read())
            continue
        if isinstance(value, UploadFile):
            raise errors.InvalidRequestError(
                f"{name} must be a text field, not a file; only image and mask are files",
                param=name,
            )
        if name in fields:
            raise errors.InvalidRequestError(
                f"{name} was sent more than once; send each field once",
                param=name,
            )
        if value.strip():
            fields[name] = value.strip()
    if len(masks) > 1:
        raise errors.InvalidRequestError(
            f"mask was sent {len(masks)} times; send one mask (it applies to the first image)",
            param="mask",
        )
    body = validated(fields, lax=True)
    return body.with_inputs(_required_images(images), masks[0] if masks else None)


def edit_from_json(raw: bytes) -> ImageEditRequest:
    """POST /v1/jobs with a JSON body: the edit fields, and `image` (a base64 string or a
    list of them; raw base64 or data: URLs) and `mask` (one) when it is an edit."""
    try:
        # surrogatepass: as json.loads reads bytes; a lone surrogate then fails its field.
        text = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise errors.InvalidRequestError(
            "the request body could not be read: send JSON (UTF-8) or a multipart form"
        ) from None
    try:
        decoded = json.loads(text)
    except ValueError:
        invalid = {"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}
        raise RequestValidationError([invalid]) from None
    if not isinstance(decoded, dict):
        invalid = {"type": "model_type", "loc": ("body",), "msg": "not an object"}
        raise RequestValidationError([invalid]) from None
    image = decoded.pop("image", None)
    mask = decoded.pop("mask", None)
    body = validated(decoded, lax=False)
    texts = [image] if isinstance(image, str) else image
    if texts is None:
        images: tuple[bytes, ...] = ()
    elif isinstance(texts, list) and all(isinstance(t, str) for t in texts):
        images = tuple(base64_image(t, param="image") for t in texts)
    else:
        raise errors.InvalidRequestError(
            "image must be base64 text (raw or a data: URL) or a list of them", param="image"
        )
    if mask is not None and not isinstance(mask, str):
        raise errors.InvalidRequestError(
            "mask must be base64 text (raw or a data: URL)", param="mask"
        )
    if mask is not None and not images:
        raise errors.InvalidRequestError(
            "mask needs an image: send the image to edit with it", param="mask"
        )
    mask_bytes = base64_image(mask, param="mask") if mask is not None else None
    return body.with_inputs(images, mask_bytes)


def validated(fields: Mapping[str, Any], *, lax: bool) -> ImageEditRequest:
    try:
        if lax:
            return ImageEditRequest.model_validate(dict(fields), strict=False, context=LAX)
        return ImageEditRequest.model_validate(dict(fields))
    except ValidationError as exc:
        # The app's one validation handler turns it into the 400 envelope naming the field.
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _required_images(images: list[bytes]) -> tuple[bytes, ...]:
    if not images:
        raise errors.InvalidRequestError(
            "image is required: upload the image to edit as the file field 'image' (several "
            "as repeated 'image[]')",
            param="image",
        )
    return tuple(images)
