"""OpenAI Images stub: `POST /v1/images/generations` and `POST /v1/images/edits` (multipart),
bodies validated against the official `CreateImageRequest` / `CreateImageEditRequest` schemas
(specs/openai-openapi.yaml), errors in the OpenAI envelope."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.stubs.common import (
    Recorded,
    SchemaCheck,
    StubState,
    make_image,
    openai_spec,
    picture,
    read_form,
    scripted,
)

DALLE_ONLY = ("response_format", "style")
GPT_ONLY = ("output_format", "output_compression", "background", "moderation")
GPT_EDIT_ONLY = ("output_format", "output_compression", "background", "input_fidelity")
EDIT_FORMATS = {"gpt-image": ("PNG", "WEBP", "JPEG"), "dall-e-2": ("PNG",)}


def typed(fields: dict[str, str], schema: dict[str, Any]) -> dict[str, Any]:
    """Form fields (every number arrives as a string) as the JSON types the schema names, so
    the schema check sees what the server would parse; a value that does not parse stays a
    string and fails the check."""
    body: dict[str, Any] = {}
    for name, value in fields.items():
        prop = schema.get("properties", {}).get(name, {})
        types = {prop.get("type")} | {alt.get("type") for alt in prop.get("anyOf", [])}
        if "integer" in types and value.lstrip("-").isdigit():
            body[name] = int(value)
        elif "boolean" in types and value in ("true", "false"):
            body[name] = value == "true"
        else:
            body[name] = value
    return body


def envelope(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    **headers: str,
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


def model_not_found(model: str) -> JSONResponse:
    return envelope(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def moderation_blocked() -> dict[str, Any]:
    return {
        "error": {
            "message": "Your request was rejected by the safety system.",
            "type": "image_generation_user_error",
            "param": None,
            "code": "moderation_blocked",
        }
    }


def content_policy_violation() -> dict[str, Any]:
    return {
        "error": {
            "message": "Your request was rejected as a result of our safety system.",
            "type": "invalid_request_error",
            "param": None,
            "code": "content_policy_violation",
        }
    }


class OpenAIStub:
    def __init__(
        self, *, api_key: str = "sk-test-openai-good", models: tuple[str, ...] = ("gpt-image-2",)
    ) -> None:
        self.api_key = api_key
        self.models = set(models)
        self.state = StubState()
        self.url = ""  # set by tests.stubs.fixtures.live
        self.check = SchemaCheck(openai_spec(), "CreateImageRequest")
        self.edit_check = SchemaCheck(openai_spec(), "CreateImageEditRequest")
        self.app = Starlette(
            routes=[
                Route("/v1/images/generations", self.generate, methods=["POST"]),
                Route("/v1/images/edits", self.edit, methods=["POST"]),
            ]
        )

    async def generate(self, request: Request) -> Response:
        state = self.state
        try:
            body = await request.json()
        except ValueError:
            body = None
        state.record(
            Recorded("generate", "POST", request.url.path, dict(request.headers), json=body)
        )
        problems = self.check.problems(body)
        if isinstance(body, dict):
            problems += self._wire_rules(body)
        if problems:
            state.reject(f"CreateImageRequest: {problems}")
            return envelope(400, f"Invalid request: {problems}", "invalid_request_error", None)
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            given = request.headers.get("authorization", "")[7:]
            # Like the real API, echo a masked form of the key: the client must not repeat it.
            return envelope(
                401,
                f"Incorrect API key provided: {given[:6]}****{given[-4:]}.",
                "invalid_request_error",
                "invalid_api_key",
            )
        answer, step = await scripted(state, "generate")
        if answer is not None:
            return answer
        model = body.get("model") or "dall-e-2"
        if model not in self.models:
            return model_not_found(model)
        width, height = (int(x) for x in str(body.get("size", "1024x1024")).split("x"))
        fmt = body.get("output_format") or "png"
        n = body.get("n") or 1
        data = [
            {
                "b64_json": base64.b64encode(
                    make_image(width, height, f"{body['prompt']}|{model}|{i}", fmt)
                ).decode()
            }
            for i in range(n)
        ]
        answer_body: dict[str, Any] = {"created": int(time.time()), "data": data}
        # DALL-E always revises the prompt; a GPT image model may (the "revised" variant).
        if model.startswith("dall-e") or (step is not None and step.variant == "revised"):
            for item in data:
                item["revised_prompt"] = f"A detailed picture of {body['prompt']}"
        else:
            answer_body |= {
                "output_format": fmt,
                "size": body.get("size"),
                "quality": "medium" if body.get("quality") in (None, "auto") else body["quality"],
                "usage": {
                    "input_tokens": 60,
                    "output_tokens": 4160 * n,
                    "total_tokens": 60 + 4160 * n,
                    "input_tokens_details": {"text_tokens": 50, "image_tokens": 10},
                },
            }
        return JSONResponse(answer_body)

    async def edit(self, request: Request) -> Response:
        state = self.state
        fields, files, problems = await read_form(request)
        state.record(
            Recorded(
                "edit", "POST", request.url.path, dict(request.headers), form=fields, files=files
            )
        )
        schema = openai_spec()["components"]["schemas"]["CreateImageEditRequest"]
        body = typed(fields, schema)
        images = files.get("image", []) + files.get("image[]", [])
        if "image" in files and "image[]" in files:
            problems.append("send one 'image' or repeated 'image[]', not both")
        if len(files.get("image", [])) > 1:
            problems.append("several images go as repeated 'image[]'")
        # The schema sees files as its binary strings: one, or an array for image[].
        checked = dict(body)
        if images:
            checked["image"] = ["<binary>"] * len(images) if "image[]" in files else "<binary>"
        if "mask" in files:
            checked["mask"] = "<binary>"
        problems += [
            f"unknown file field '{k}'" for k in sorted(set(files) - {"image", "image[]", "mask"})
        ]
        problems += self.edit_check.problems(checked)
        problems += self._wire_rules(body, edit=True)
        problems += self._file_rules(str(body.get("model") or ""), images, files.get("mask", []))
        if problems:
            state.reject(f"CreateImageEditRequest: {problems}")
            return envelope(400, f"Invalid request: {problems}", "invalid_request_error", None)
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return envelope(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        answer, _ = await scripted(state, "edit")
        if answer is not None:
            return answer
        model = str(body["model"])
        if model not in self.models:
            return model_not_found(model)
        first = picture(images[0])
        assert first is not None  # _file_rules checked it
        size = str(body.get("size") or f"{first.width}x{first.height}")
        width, height = (int(x) for x in size.split("x"))
        fmt = body.get("output_format") or "png"
        n = body.get("n") or 1
        # The pixels depend on the prompt and every input, so a test sees a changed input.
        inputs = hashlib.sha256(b"".join(images + files.get("mask", []))).hexdigest()
        key = f"{body['prompt']}|{model}|{inputs}"
        data = [
            {"b64_json": base64.b64encode(make_image(width, height, f"{key}|{i}", fmt)).decode()}
            for i in range(n)
        ]
        answer_body: dict[str, Any] = {"created": int(time.time()), "data": data}
        if model.startswith("gpt-image"):
            image_tokens = 1000 * len(images)  # input images bill as image input tokens
            answer_body |= {
                "output_format": fmt,
                "size": size,
                "usage": {
                    "input_tokens": 50 + image_tokens,
                    "output_tokens": 4160 * n,
                    "total_tokens": 50 + image_tokens + 4160 * n,
                    "input_tokens_details": {"text_tokens": 50, "image_tokens": image_tokens},
                },
            }
        return JSONResponse(answer_body)

    @staticmethod
    def _file_rules(model: str, images: list[bytes], masks: list[bytes]) -> list[str]:
        """The spec's words on the files: GPT image models take up to 16 png/webp/jpg images,
        dall-e-2 one square PNG; the mask is a PNG with alpha, the size of the first image."""
        if not images:
            return ["image is required"]
        family = "dall-e-2" if model.startswith("dall-e-2") else "gpt-image"
        problems = []
        if family == "dall-e-2" and len(images) > 1:
            problems.append("dall-e-2 takes one image")
        shapes = [picture(data) for data in images]
        for index, shape in enumerate(shapes):
            if shape is None or shape.format not in EDIT_FORMATS[family]:
                problems.append(f"image {index} is not a {'/'.join(EDIT_FORMATS[family])} image")
            elif family == "dall-e-2" and shape.width != shape.height:
                problems.append("dall-e-2 edits square images only")
        if len(masks) > 1:
            problems.append("one mask at most")
        if masks:
            mask, first = picture(masks[0]), shapes[0]
            if mask is None or mask.format != "PNG" or "A" not in mask.mode:
                problems.append("mask must be a PNG with an alpha channel (transparent = edit)")
            elif first is not None and (mask.width, mask.height) != (first.width, first.height):
                problems.append("mask must have the same dimensions as image")
        return problems

    @staticmethod
    def _wire_rules(body: dict[str, Any], *, edit: bool = False) -> list[str]:
        """PROVIDERS.md rules the schema cannot say (they depend on the model)."""
        problems = []
        model = str(body.get("model") or "")
        if not model:
            problems.append("model must always be sent (the server default is dall-e-2)")
        if model.startswith("gpt-image"):
            problems += [f"'{k}' is for DALL-E only" for k in DALLE_ONLY if k in body]
        if model.startswith("dall-e"):
            gpt_only = GPT_EDIT_ONLY if edit else GPT_ONLY
            problems += [f"'{k}' is for GPT image models only" for k in gpt_only if k in body]
            if model.startswith("dall-e-3") and body.get("n", 1) != 1:
                problems.append("dall-e-3 takes n=1 only")
        if edit and model.startswith("dall-e-3"):
            problems.append("dall-e-3 has no edits")
        size = str(body.get("size", "1024x1024"))
        width, sep, height = size.partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            problems.append(f"size '{size}' is not WIDTHxHEIGHT")
        elif model.startswith("dall-e-2") and size not in ("256x256", "512x512", "1024x1024"):
            problems.append(f"size '{size}' is not valid for dall-e-2")
        elif model.startswith("gpt-image-2"):
            w, h = int(width), int(height)
            if w % 16 or h % 16 or max(w, h) > 3 * min(w, h) or max(w, h) > 3840:
                problems.append(f"size '{size}' is not valid for gpt-image-2")
        return problems
