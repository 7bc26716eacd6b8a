"""Stability AI v2beta stub: `POST /v2beta/stable-image/generate/{ultra|core|sd3}` and
`POST /v2beta/stable-image/edit/inpaint`, multipart form only, JSON answers `{image, seed,
finish_reason}`, errors `{id, name, errors}`.

No official Stability spec is in ../shared/specs: the rules here are Stability's v2beta API
reference as published (image-to-image: `image` + `strength`, sd3 with `mode=image-to-image`
and no `aspect_ratio`; inpaint: `image`, optional `mask` of the image's size, `grow_mask`)."""

from __future__ import annotations

import base64
import hashlib
import math
import random
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.stubs.common import Recorded, StubState, make_image, picture, read_form, scripted

ASPECT_RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
SD3_MODELS = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash")
COMMON_FIELDS = {
    "prompt",
    "negative_prompt",
    "aspect_ratio",
    "seed",
    "output_format",
    "style_preset",
}
SD3_FIELDS = COMMON_FIELDS | {"model", "cfg_scale", "mode", "strength"}
ULTRA_FIELDS = COMMON_FIELDS | {"strength"}
INPAINT_FIELDS = {"prompt", "negative_prompt", "grow_mask", "seed", "output_format", "style_preset"}


def error(status: int, name: str, *errors: str) -> JSONResponse:
    return JSONResponse(
        {"id": "0123456789abcdef", "name": name, "errors": list(errors)}, status_code=status
    )


def content_moderation() -> dict[str, Any]:
    return {
        "id": "0123456789abcdef",
        "name": "content_moderation",
        "errors": ["Your request was flagged by our content moderation system."],
    }


class StabilityStub:
    def __init__(self, *, api_key: str = "sk-test-stability-good") -> None:
        self.api_key = api_key
        self.state = StubState()
        self.url = ""  # set by tests.stubs.fixtures.live
        self.app = Starlette(
            routes=[
                Route("/v2beta/stable-image/generate/{endpoint}", self.generate, methods=["POST"]),
                Route("/v2beta/stable-image/edit/{endpoint}", self.edit, methods=["POST"]),
            ]
        )

    async def edit(self, request: Request) -> Response:
        return await self.generate(request, route="edit")

    async def generate(self, request: Request, route: str = "generate") -> Response:
        state = self.state
        endpoint = request.path_params["endpoint"]
        fields, files, problems = await read_form(request)
        state.record(
            Recorded(
                route, "POST", request.url.path, dict(request.headers), form=fields, files=files
            )
        )
        known = ("inpaint",) if route == "edit" else ("ultra", "core", "sd3")
        if endpoint not in known:
            return error(404, "not_found", f"no endpoint {endpoint}")
        problems += self._wire_rules(endpoint, fields, request.headers.get("accept", ""))
        problems += self._file_rules(endpoint, fields, files)
        if problems:
            state.reject(f"stability {endpoint}: {problems}")
            return error(400, "bad_request", *problems)
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "unauthorized", "authorization: invalid or missing header value")
        answer, step = await scripted(state, route)
        if answer is not None:
            return answer
        seed = int(fields.get("seed", "0")) or random.randint(1, 4_294_967_294)
        width, height = self._size(fields.get("aspect_ratio", "1:1"))
        init = picture(files["image"][0]) if files.get("image") else None
        if init is not None:  # the output takes the input's size
            width, height = init.width, init.height
        fmt = fields.get("output_format", "png")
        filtered = step is not None and step.variant == "filtered"
        inputs = hashlib.sha256(
            b"".join(part for parts in files.values() for part in parts)
        ).hexdigest()
        key = f"{fields['prompt']}|{seed}|{filtered}|{fields.get('strength')}|{inputs}"
        image = make_image(width, height, key, fmt)
        return JSONResponse(
            {
                "image": base64.b64encode(image).decode(),
                "seed": seed,
                "finish_reason": "CONTENT_FILTERED" if filtered else "SUCCESS",
            }
        )

    @staticmethod
    def _size(ratio: str) -> tuple[int, int]:
        """About one megapixel at the ratio, sides multiples of 64 (as the service returns)."""
        a, b = (int(x) for x in ratio.split(":"))
        width = round(math.sqrt(1024 * 1024 * a / b) / 64) * 64
        height = round(width * b / a / 64) * 64
        return width, height

    @staticmethod
    def _file_rules(
        endpoint: str, fields: dict[str, str], files: dict[str, list[bytes]]
    ) -> list[str]:
        allowed = {"inpaint": {"image", "mask"}, "ultra": {"image"}, "sd3": {"image"}}
        problems = [
            f"'{k}' was sent as a file" for k in sorted(set(files) - allowed.get(endpoint, set()))
        ]
        if any(len(parts) > 1 for parts in files.values()):
            problems.append("one file per field")
        image = picture(files["image"][0]) if files.get("image") else None
        if files.get("image") and image is None:
            problems.append("image is not an image")
        if endpoint == "inpaint" and not files.get("image"):
            problems.append("image is required")
        if files.get("mask"):
            mask = picture(files["mask"][0])
            if mask is None:
                problems.append("mask is not an image")
            elif image is not None and (mask.width, mask.height) != (image.width, image.height):
                problems.append("mask must have the image's dimensions")
        with_image = bool(files.get("image")) and endpoint != "inpaint"
        if with_image and "strength" not in fields:
            problems.append("strength is required with an image")
        if "strength" in fields and not with_image:
            problems.append("strength is only for image-to-image")
        if "strength" in fields:
            try:
                if not 0 <= float(fields["strength"]) <= 1:
                    problems.append("strength must be 0..1")
            except ValueError:
                problems.append(f"strength '{fields['strength']}' is not a number")
        if endpoint == "sd3" and (fields.get("mode") == "image-to-image") != with_image:
            problems.append("sd3 takes an image exactly in mode image-to-image")
        if with_image and "aspect_ratio" in fields:
            problems.append("aspect_ratio is not accepted with an image")
        return problems

    @staticmethod
    def _wire_rules(endpoint: str, fields: dict[str, str], accept: str) -> list[str]:
        problems = []
        if accept not in ("application/json", "image/*"):
            problems.append(f"accept must be application/json or image/*, got '{accept}'")
        allowed = {"sd3": SD3_FIELDS, "ultra": ULTRA_FIELDS, "inpaint": INPAINT_FIELDS}.get(
            endpoint, COMMON_FIELDS
        )
        problems += [f"unknown field '{k}'" for k in sorted(set(fields) - allowed)]
        if not fields.get("prompt"):
            problems.append("prompt is required")
        if fields.get("aspect_ratio", "1:1") not in ASPECT_RATIOS:
            problems.append(f"aspect_ratio '{fields['aspect_ratio']}' is not supported")
        seed = fields.get("seed", "0")
        if not seed.isdigit() or int(seed) > 4_294_967_294:
            problems.append(f"seed '{seed}' is not in 0..4294967294")
        if fields.get("output_format", "png") not in ("png", "jpeg", "webp"):
            problems.append(f"output_format '{fields['output_format']}'")
        if endpoint == "sd3" and fields.get("model", "sd3.5-large") not in SD3_MODELS:
            problems.append(f"model '{fields['model']}' is not an sd3.5 model")
        if "cfg_scale" in fields:
            try:
                float(fields["cfg_scale"])
            except ValueError:
                problems.append(f"cfg_scale '{fields['cfg_scale']}' is not a number")
        return problems
