"""The one wire schema of an image request (pydantic): the fields of POST /v1/images/generations,
shared by the HTTP API (server/http/protocol.py re-exports it) and batch rows (server/batch),
with the size parser and the mapping onto the service's ImageRequest.

It lives here, under neither edge, because both edges read it and server/batch must not import
server/http. JSON is validated strictly (a seed is a number, not "16"); CSV cells, which are
all strings, are validated with `strict=False` by the batch reader."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

from server import errors
from server.request import MAX_N, ImageRequest, LoraRequest

# Validation context of the lax edges (form fields, CSV cells): every value arrives as text.
LAX = {"lax": True}


def _encodable(value: str) -> str:
    """Refuse text UTF-8 cannot encode: a lone surrogate (the JSON escape "\\ud800", or the
    raw bytes ED A0 80) passes JSON decoding but breaks every later step that writes the text
    (tokenizer, database, response)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "unicode_surrogate",
            "must be text UTF-8 can encode: character {position} is a lone surrogate (U+{code});"
            " send the character itself, or both halves of a surrogate pair",
            {"position": exc.start, "code": f"{ord(value[exc.start]):04X}"},
        ) from None
    return value


# Every free-text field of the schema is Text.
Text = Annotated[str, AfterValidator(_encodable)]


def unencodable_at(value: Any, path: str = "") -> str | None:
    """The dotted path of the first text in a decoded JSON value (keys included) that UTF-8
    cannot encode, or None. For bodies that keep unknown keys (A1111's): they are echoed back,
    and a lone surrogate there would fail only when the response is written."""
    if isinstance(value, str):
        return None if _utf8(value) else (path or "body")
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _utf8(key):
                return path or "body"
            found = unencodable_at(item, where)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = unencodable_at(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


# How deep a kept-as-is JSON value may nest (A1111's unknown keys, echoed back): deep enough for
# any client's real body (scripts' args nest three or four levels), far below the recursion
# limit that json.dumps would hit writing the echo (a 500).
MAX_JSON_DEPTH = 32


def deeper_than(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a decoded JSON value nests more than `limit` arrays/objects deep (it stops
    looking once it is)."""
    if limit < 0:
        return True
    if isinstance(value, dict):
        return any(deeper_than(item, limit - 1) for item in value.values())
    if isinstance(value, list):
        return any(deeper_than(item, limit - 1) for item in value)
    return False


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_text(value: Any, info: ValidationInfo) -> Any:
    """A list field given as text where every value is text (a form field, a CSV cell): read
    it as JSON. JSON bodies send the list itself (strict: text is refused there)."""
    if isinstance(value, str) and (info.context or {}).get("lax"):
        try:
            return json.loads(value)
        except ValueError:
            raise PydanticCustomError(
                "json_text",
                'must be JSON text, for example [{"name": "watercolor", "weight": 0.8}]',
            ) from None
    return value


class LoraField(BaseModel):
    """One adapter of `loras`: a file stem of the LoRA library (`imagegen loras`), its weight."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Text
    weight: float = Field(default=1.0, allow_inf_nan=False)


class ImageFields(BaseModel):
    """The fields that decide an image: a batch row, and the core of an HTTP request body.
    Unknown fields are refused by name, so a typo (`negative` for `negative_prompt`) fails
    instead of being silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Text
    model: Text | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    size: Text | None = None
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: Text | None = None
    # imagegen extensions (send them through the OpenAI SDK's `extra_body`).
    negative_prompt: Text | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = Field(default=None, allow_inf_nan=False)
    scheduler: Text | None = None
    preset: Text | None = None
    # Data residency for this request: never sent to a hosted provider, whatever the server
    # allows (a hosted model is refused with code local_only).
    local_only: bool | None = None
    # Adapters besides those the prompt names as <lora:name:weight>.
    loras: Annotated[list[LoraField] | None, BeforeValidator(_json_text)] = None

    def to_image_request(self, *, request_id: str | None = None) -> ImageRequest:
        """The service's request: sizes parsed, OpenAI spellings mapped, once, here."""
        width, height = parse_size(self.size)
        output_format = self.output_format or "png"
        return ImageRequest(
            prompt=self.prompt,
            model=self.model,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            n=self.n if self.n is not None else 1,
            seed=self.seed,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            scheduler=self.scheduler,
            quality=self.quality,
            style=self.style,
            preset=self.preset,
            output_format=output_format,
            background=self.background,
            moderation=self.moderation,
            # PNG is lossless: a compression level would only split the cache and the batch.
            output_compression=None if output_format == "png" else self.output_compression,
            user=self.user,
            local_only=bool(self.local_only),
            loras=tuple(LoraRequest(lora.name, lora.weight) for lora in self.loras or ()),
            request_id=request_id,
        )

    def edge_dropped_params(self) -> tuple[str, ...]:
        """Fields dropped here rather than by the service or the backend."""
        if self.output_compression is not None and (self.output_format or "png") == "png":
            return ("output_compression",)
        return ()


class EditFields(BaseModel):
    """The fields of an image input (img2img, inpainting, an edit), besides the images
    themselves (uploads over HTTP, paths or base64 in batch rows: each edge reads its own).
    Ranges are the service's checks (server/request.py), worded there once."""

    model_config = ConfigDict(extra="forbid", strict=True)

    strength: float | None = Field(default=None, allow_inf_nan=False)
    mask_blur: int | None = None
    inpaint_area: Literal["whole", "masked"] | None = None
    inpaint_padding: int | None = None
    resize_mode: Literal["crop", "stretch", "pad"] | None = None
    input_fidelity: Literal["high", "low"] | None = None

    def with_edit_fields(self, request: ImageRequest) -> ImageRequest:
        """`request` with these fields set (the dataclass defaults where not given)."""
        given = {
            name: value
            for name in EditFields.model_fields
            if (value := getattr(self, name)) is not None
        }
        return dataclasses.replace(request, **given)


# Fields only an image input has: on /v1/images/generations they are refused with a pointer
# to the edits endpoint (server/http/errors.py words it).
EDIT_ONLY_FIELDS: frozenset[str] = frozenset({"image", "image[]", "mask", *EditFields.model_fields})


class RowFields(ImageFields, EditFields):
    """A batch row: the image fields, the edit fields, and its inputs as text (`image`: one
    or a list; `mask`): paths relative to the batch file, or base64 (server/batch/rows.py)."""

    image: Text | list[Text] | None = None
    mask: Text | None = None


class ImageGenerationRequest(ImageFields):
    """POST /v1/images/generations and POST /v1/jobs: the image fields plus how the response
    carries the image (a batch writes files instead, so its rows have neither)."""

    # b64_json by default: the image comes back in the response, no second request needed.
    response_format: Literal["b64_json", "url"] | None = None
    # Server-sent events in OpenAI's format instead of one JSON body (server/http/streaming.py):
    # `partial_images` previews of the denoising state, then the images. Without stream,
    # partial_images does nothing, as at OpenAI.
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    # Seconds this request may take, queue wait included (an extension; also the
    # X-Request-Timeout header): past it 504 `timeout` and the work is cancelled.
    timeout: float | None = Field(default=None, gt=0, le=86400, allow_inf_nan=False)

    def edge_dropped_params(self) -> tuple[str, ...]:
        dropped = super().edge_dropped_params()
        # Previews are what a stream is for; without one there is nowhere to send them.
        return (*dropped, "partial_images") if self.partial_images and not self.stream else dropped


class ImageEditRequest(ImageGenerationRequest, EditFields):
    """POST /v1/images/edits (multipart form fields, validated with the LAX context) and
    POST /v1/jobs (JSON, strict): the generation fields plus the edit fields. The images
    themselves are not fields of the schema: each edge reads them (uploaded files, base64
    members) and hands them over with `with_inputs`, so they are never echoed into a job's
    stored record."""

    _images: tuple[bytes, ...] = PrivateAttr(default=())
    _mask: bytes | None = PrivateAttr(default=None)

    def with_inputs(self, images: tuple[bytes, ...], mask: bytes | None) -> ImageEditRequest:
        self._images, self._mask = images, mask
        return self

    def to_image_request(self, *, request_id: str | None = None) -> ImageRequest:
        request = self.with_edit_fields(super().to_image_request(request_id=request_id))
        return dataclasses.replace(
            request,
            images=self._images,
            mask=self._mask,
            # OpenAI's convention: the mask's transparent pixels are the area to edit.
            mask_convention="alpha",
        )


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """ "WIDTHxHEIGHT" or "auto" (the model's default size): the one size parser."""
    if size is None or size.strip() == "auto":
        return None, None
    parts = size.strip().lower().split("x")
    # ASCII digits only: str.isdigit() also passes "²" (which int() refuses) and "٦٤"
    # (which it reads as 64).
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 5 for p in parts):
        raise errors.InvalidRequestError(
            f"size must be WIDTHxHEIGHT (for example 1024x1024) or 'auto', got '{size}'",
            param="size",
        )
    width, height = int(parts[0]), int(parts[1])
    if width <= 0 or height <= 0:
        raise errors.InvalidRequestError(
            f"size must have both sides above zero, got '{size}'", param="size"
        )
    return width, height


def base64_image(text: str, *, param: str) -> bytes:
    """An image sent as text: a `data:` URL (`data:image/png;base64,...`) or raw base64, as
    A1111 clients and browsers send them. What the bytes are is decided later, from their
    content (server/inputs.py)."""
    payload = text.strip()
    if payload.startswith("data:"):
        header, comma, payload = payload.partition(",")
        if not comma or not header.endswith(";base64"):
            raise errors.InvalidRequestError(
                f"{param}: a data URL must be base64, like 'data:image/png;base64,iVBOR...'",
                param=param,
            )
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidRequestError(
            f"{param} is not valid base64; send the image file's bytes as base64 or as a data: URL",
            param=param,
        ) from None
