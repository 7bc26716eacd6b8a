"""Black Forest Labs stub: `POST /v1/{model}` (body validated against the model's request
schema in specs/bfl-openapi.json) -> {id, polling_url, cost}; `GET polling_url` -> status;
`result.sample` -> a signed-looking download URL."""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.stubs.common import (
    Recorded,
    SchemaCheck,
    StubState,
    bfl_spec,
    make_image,
    picture,
    scripted,
)

# Credits per task (the submit answer's `cost`), $0.01 each.
CREDITS = {
    "flux-pro-1.1": 4.0,
    "flux-pro-1.1-ultra": 6.0,
    "flux-dev": 2.5,
    "flux-2-pro": 3.0,
    "flux-kontext-pro": 4.0,
    "flux-kontext-max": 8.0,
    "flux-pro-1.0-fill": 5.0,
}
IMAGE_FIELDS = ("image", "mask", "input_image", *(f"input_image_{i}" for i in range(2, 9)))


def image_problems(body: dict[str, Any]) -> list[str]:
    """The spec's words the schema cannot check: each image field is a base64 image, and
    Fill's mask has the image's dimensions."""
    problems = []
    shapes = {}
    for name in IMAGE_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        try:
            shape = picture(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError, TypeError):
            shape = None
        if shape is None:
            problems.append(f"{name} is not a base64-encoded image")
        shapes[name] = shape
    image, mask = shapes.get("image"), shapes.get("mask")
    if (
        image is not None
        and mask is not None
        and (image.width, image.height)
        != (
            mask.width,
            mask.height,
        )
    ):
        problems.append("mask must have the dimensions of image")
    return problems


@dataclass
class Task:
    id: str
    model: str
    prompt: str
    seed: int | None
    width: int
    height: int
    fmt: str
    outcome: str = "Ready"
    pending_polls: int = 2
    polls: int = 0


class BFLStub:
    def __init__(self, *, api_key: str = "bfl-test-good", pending_polls: int = 2) -> None:
        self.api_key = api_key
        self.pending_polls = pending_polls
        self.state = StubState()
        self.url = ""  # set by tests.stubs.fixtures.live
        self.tasks: dict[str, Task] = {}
        self._ids = itertools.count(1)
        self._checks: dict[str, SchemaCheck] = {}
        self.app = Starlette(
            routes=[
                # Polling lives under a "regional" prefix: the client must use the URL it is
                # given, not build its own.
                Route("/eu/v1/get_result", self.poll, methods=["GET"]),
                Route("/delivery/{task_id}/sample.{fmt}", self.download, methods=["GET"]),
                Route("/v1/{model}", self.submit, methods=["POST"]),
            ]
        )

    def _check_for(self, model: str) -> SchemaCheck | None:
        if model not in self._checks:
            path = bfl_spec()["paths"].get(f"/v1/{model}")
            if path is None:
                return None
            ref = path["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            self._checks[model] = SchemaCheck(bfl_spec(), ref.rsplit("/", 1)[-1])
        return self._checks[model]

    async def submit(self, request: Request) -> Response:
        state = self.state
        model = request.path_params["model"]
        try:
            body = await request.json()
        except ValueError:
            body = None
        state.record(Recorded("submit", "POST", request.url.path, dict(request.headers), json=body))
        check = self._check_for(model)
        if check is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        problems = check.problems(body)
        if isinstance(body, dict):
            problems += image_problems(body)
        if problems:
            state.reject(f"bfl {model}: {problems}")
            return JSONResponse(
                {"detail": [{"loc": ["body"], "msg": p, "type": "value_error"} for p in problems]},
                status_code=422,
            )
        if request.headers.get("x-key") != self.api_key:
            return JSONResponse({"detail": "Invalid API key"}, status_code=403)
        answer, _ = await scripted(state, "submit")
        if answer is not None:
            return answer
        outcome = state.next_step("task")
        width, height = body.get("width", 1024), body.get("height", 768)
        if "image" in body:  # Fill: the output is the input's size
            shape = picture(base64.b64decode(body["image"]))
            assert shape is not None  # image_problems checked it
            width, height = shape.width, shape.height
        if "aspect_ratio" in body:
            a, b = (int(x) for x in body["aspect_ratio"].split(":"))
            width = round(math.sqrt(1024 * 1024 * a / b) / 32) * 32
            height = round(width * b / a / 32) * 32
        task = Task(
            id=f"task-{next(self._ids)}",
            model=model,
            # The pixels depend on every input image, so a test sees a changed input.
            prompt=body.get("prompt", "")
            + hashlib.sha256(
                "".join(str(body.get(name)) for name in IMAGE_FIELDS).encode()
            ).hexdigest(),
            seed=body.get("seed"),
            width=width,
            height=height,
            fmt=body.get("output_format") or "jpeg",
            outcome=outcome.variant if outcome is not None and outcome.variant else "Ready",
            pending_polls=self.pending_polls,
        )
        self.tasks[task.id] = task
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {
                "id": task.id,
                "polling_url": f"{base}/eu/v1/get_result?id={task.id}",
                "cost": CREDITS.get(model, 4.0),
                "input_mp": 0.0,
                "output_mp": round(width * height / 1_000_000, 2),
            }
        )

    async def poll(self, request: Request) -> Response:
        state = self.state
        task_id = request.query_params.get("id", "")
        state.record(
            Recorded(
                "poll",
                "GET",
                request.url.path,
                dict(request.headers),
                query=dict(request.query_params),
            )
        )
        if request.headers.get("x-key") != self.api_key:
            return JSONResponse({"detail": "Invalid API key"}, status_code=403)
        answer, _ = await scripted(state, "poll")
        if answer is not None:
            return answer
        task = self.tasks.get(task_id)
        if task is None:
            return JSONResponse({"id": task_id, "status": "Task not found"})
        task.polls += 1
        if task.polls <= task.pending_polls:
            return JSONResponse(
                {
                    "id": task.id,
                    "status": "Pending",
                    "progress": task.polls / (task.pending_polls + 1),
                }
            )
        if task.outcome != "Ready":
            details = {"reason": "moderated"} if "Moderated" in task.outcome else {"error": "x"}
            return JSONResponse({"id": task.id, "status": task.outcome, "details": details})
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {
                "id": task.id,
                "status": "Ready",
                "progress": 1.0,
                "result": {
                    "sample": f"{base}/delivery/{task.id}/sample.{task.fmt}?se=2026-11-28&sig=x",
                    "prompt": task.prompt,
                    "seed": task.seed,
                },
            }
        )

    async def download(self, request: Request) -> Response:
        state = self.state
        state.record(Recorded("download", "GET", request.url.path, dict(request.headers)))
        if "x-key" in request.headers:
            state.reject("the API key was sent to the signed result URL")
        answer, _ = await scripted(state, "download")
        if answer is not None:
            return answer
        task = self.tasks.get(request.path_params["task_id"])
        if task is None:
            return Response(status_code=404)
        data = make_image(task.width, task.height, f"{task.prompt}|{task.seed}", task.fmt)
        return Response(data, media_type=f"image/{task.fmt}")


def moderated(kind: str = "Content Moderated") -> Any:
    """A `task` script step: the next submitted task ends in this status."""
    from tests.stubs.common import variant

    return variant(kind)
