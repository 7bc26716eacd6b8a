"""Remote imagegen stub: imagegen's own OpenAI-compatible `POST /v1/images/generations`, with
the extension fields, per-item seeds, the `imagegen` object, and OpenAI-envelope errors."""

from __future__ import annotations

import base64
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.stubs.common import Recorded, StubState, make_image, scripted
from tests.stubs.openai_stub import envelope

FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "prompt": (str,),
    "n": (int,),
    "size": (str,),
    "seed": (int,),
    "negative_prompt": (str,),
    "steps": (int,),
    "guidance_scale": (int, float),
    "scheduler": (str,),
    "quality": (str,),
    "style": (str,),
    "output_format": (str,),
    "background": (str,),
    "moderation": (str,),
    "output_compression": (int,),
    "response_format": (str,),
    "preset": (str,),
    "user": (str,),
}


# The remote server's own preset: its revised prompt carries this suffix.
REMOTE_PRESET_SUFFIX = "35mm photograph, natural light"


class ImagegenStub:
    def __init__(
        self, *, api_key: str = "ig-test-good", models: tuple[str, ...] = ("sdxl",)
    ) -> None:
        self.api_key = api_key
        self.models = set(models)
        self.state = StubState()
        self.url = ""  # set by tests.stubs.fixtures.live
        self.app = Starlette(
            routes=[Route("/v1/images/generations", self.generate, methods=["POST"])]
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
        problems = self._wire_rules(body)
        if problems:
            state.reject(f"imagegen: {problems}")
            return envelope(400, "; ".join(problems), "invalid_request_error", "invalid_value")
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return envelope(401, "invalid API key", "authentication_error", "invalid_api_key")
        answer, _ = await scripted(state, "generate")
        if answer is not None:
            return answer
        if body["model"] not in self.models:
            return envelope(
                404,
                f"no model '{body['model']}'",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        width, height = (int(x) for x in body["size"].split("x"))
        fmt = body.get("output_format", "png")
        n, seed = body.get("n", 1), body["seed"]
        data = [
            {
                "b64_json": base64.b64encode(
                    make_image(width, height, f"{body['prompt']}|{seed + i}", fmt)
                ).decode(),
                "seed": seed + i,
                # What the remote made of the prompt (its preset expanded, as imagegen does).
                "revised_prompt": f"{body['prompt']}, {REMOTE_PRESET_SUFFIX}",
            }
            for i in range(n)
        ]
        meta: dict[str, Any] = {
            "request_id": "req_remote_1",
            "model": body["model"],
            "provider": "local",
            "cached": False,
            "cost_usd": round(0.0004 * n, 6),
            "gpu_seconds": 1.5 * n,
            "timings": {"queue_ms": 1.0, "generate_ms": 1500.0 * n},
            "dropped_params": [],
        }
        return JSONResponse({"created": int(time.time()), "data": data, "imagegen": meta})

    @staticmethod
    def _wire_rules(body: Any) -> list[str]:
        if not isinstance(body, dict):
            return ["body must be a JSON object"]
        problems = [f"unknown field '{k}'" for k in sorted(set(body) - set(FIELDS))]
        for name, types in FIELDS.items():
            value = body.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                problems.append(f"'{name}' has the wrong type")
        for name in ("model", "prompt", "size", "seed"):
            if name not in body:
                problems.append(f"'{name}' is required here")
        if body.get("response_format") != "b64_json":
            problems.append("response_format must be b64_json")
        return problems
