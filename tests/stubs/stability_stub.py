"""Stability AI v2beta stub: `POST /v2beta/stable-image/generate/{ultra|core|sd3}`, multipart
form only, JSON answers `{image, seed, finish_reason}`, errors `{id, name, errors}`."""

from __future__ import annotations

import base64
import math
import random
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.stubs.common import Recorded, StubState, make_image, scripted

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
SD3_FIELDS = COMMON_FIELDS | {"model", "cfg_scale", "mode"}


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
                Route("/v2beta/stable-image/generate/{endpoint}", self.generate, methods=["POST"])
            ]
        )

    async def generate(self, request: Request) -> Response:
        state = self.state
        endpoint = request.path_params["endpoint"]
        content_type = request.headers.get("content-type", "")
        fields: dict[str, str] = {}
        problems: list[str] = []
        if not content_type.startswith("multipart/form-data"):
            problems.append(f"body must be multipart/form-data, got '{content_type}'")
        else:
            form = await request.form()
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    problems.append(f"'{name}' was sent as a file")
                else:
                    fields[name] = value
        state.record(
            Recorded("generate", "POST", request.url.path, dict(request.headers), form=fields)
        )
        if endpoint not in ("ultra", "core", "sd3"):
            return error(404, "not_found", f"no endpoint {endpoint}")
        problems += self._wire_rules(endpoint, fields, request.headers.get("accept", ""))
        if problems:
            state.reject(f"stability {endpoint}: {problems}")
            return error(400, "bad_request", *problems)
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "unauthorized", "authorization: invalid or missing header value")
        answer, step = await scripted(state, "generate")
        if answer is not None:
            return answer
        seed = int(fields.get("seed", "0")) or random.randint(1, 4_294_967_294)
        width, height = self._size(fields.get("aspect_ratio", "1:1"))
        fmt = fields.get("output_format", "png")
        filtered = step is not None and step.variant == "filtered"
        image = make_image(width, height, f"{fields['prompt']}|{seed}|{filtered}", fmt)
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
    def _wire_rules(endpoint: str, fields: dict[str, str], accept: str) -> list[str]:
        problems = []
        if accept not in ("application/json", "image/*"):
            problems.append(f"accept must be application/json or image/*, got '{accept}'")
        allowed = SD3_FIELDS if endpoint == "sd3" else COMMON_FIELDS
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
