"""OpenAI Images stub: `POST /v1/images/generations`, bodies validated against the official
`CreateImageRequest` schema (specs/openai-openapi.yaml), errors in the OpenAI envelope."""

from __future__ import annotations

import base64
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.stubs.common import Recorded, SchemaCheck, StubState, make_image, openai_spec, scripted

DALLE_ONLY = ("response_format", "style")
GPT_ONLY = ("output_format", "output_compression", "background", "moderation")


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
            return envelope(
                404,
                f"The model '{model}' does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
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

    @staticmethod
    def _wire_rules(body: dict[str, Any]) -> list[str]:
        """PROVIDERS.md rules the schema cannot say (they depend on the model)."""
        problems = []
        model = str(body.get("model") or "")
        if not model:
            problems.append("model must always be sent (the server default is dall-e-2)")
        if model.startswith("gpt-image"):
            problems += [f"'{k}' is for DALL-E only" for k in DALLE_ONLY if k in body]
        if model.startswith("dall-e"):
            problems += [f"'{k}' is for GPT image models only" for k in GPT_ONLY if k in body]
            if body.get("n", 1) != 1:
                problems.append("dall-e-3 takes n=1 only")
        size = str(body.get("size", "1024x1024"))
        width, sep, height = size.partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            problems.append(f"size '{size}' is not WIDTHxHEIGHT")
        elif model.startswith("gpt-image-2"):
            w, h = int(width), int(height)
            if w % 16 or h % 16 or max(w, h) > 3 * min(w, h) or max(w, h) > 3840:
                problems.append(f"size '{size}' is not valid for gpt-image-2")
        return problems
