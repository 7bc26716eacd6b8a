"""Remote imagegen stub: imagegen's own OpenAI-compatible `POST /v1/images/generations` and
`POST /v1/images/edits` (multipart as OpenAI defines it, with the extension fields as form
fields), per-item seeds, the `imagegen` object, and OpenAI-envelope errors."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.stubs.common import Recorded, StubState, make_image, picture, read_form, scripted
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


# The edits form: OpenAI's edit fields and imagegen's extensions, all strings on the wire.
EDIT_FIELDS: dict[str, type] = {
    "model": str,
    "prompt": str,
    "n": int,
    "size": str,
    "seed": int,
    "negative_prompt": str,
    "steps": int,
    "guidance_scale": float,
    "scheduler": str,
    "strength": float,
    "quality": str,
    "output_format": str,
    "background": str,
    "output_compression": int,
    "input_fidelity": str,
    "response_format": str,
    "preset": str,
    "user": str,
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
            routes=[
                Route("/v1/images/generations", self.generate, methods=["POST"]),
                Route("/v1/images/edits", self.edit, methods=["POST"]),
            ]
        )

    async def edit(self, request: Request) -> Response:
        state = self.state
        fields, files, problems = await read_form(request)
        state.record(
            Recorded(
                "edit", "POST", request.url.path, dict(request.headers), form=fields, files=files
            )
        )
        problems += [f"unknown field '{k}'" for k in sorted(set(fields) - set(EDIT_FIELDS))]
        for name, kind in EDIT_FIELDS.items():
            if name in fields:
                try:
                    kind(fields[name])
                except ValueError:
                    problems.append(f"'{name}' is not a {kind.__name__}")
        images = files.get("image", []) + files.get("image[]", [])
        if len(files.get("image", [])) > 1 or ("image" in files and "image[]" in files):
            problems.append("one 'image', or several as repeated 'image[]'")
        if not images or any(picture(data) is None for data in images):
            problems.append("image must be one or more image files")
        if files.get("mask"):
            mask, first = picture(files["mask"][0]), picture(images[0]) if images else None
            if mask is None or "A" not in mask.mode:
                problems.append("mask must be a PNG with alpha (transparent = edit area)")
            elif first is not None and (mask.width, mask.height) != (first.width, first.height):
                problems.append("mask must have the first image's dimensions")
        if problems:
            state.reject(f"imagegen edits: {problems}")
            return envelope(400, "; ".join(problems), "invalid_request_error", "invalid_value")
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return envelope(401, "invalid API key", "authentication_error", "invalid_api_key")
        answer, _ = await scripted(state, "edit")
        if answer is not None:
            return answer
        body: dict[str, Any] = {
            **fields,
            "n": int(fields.get("n", "1")),
            "seed": int(fields["seed"]),
            "prompt": f"{fields['prompt']}|{hashlib.sha256(b''.join(images)).hexdigest()}",
        }
        return self._answer(body)

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
        return self._answer(body)

    def _answer(self, body: dict[str, Any]) -> Response:
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
