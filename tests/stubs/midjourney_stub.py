"""midjourney-proxy stub: `POST /mj/submit/imagine` -> {code, description, result};
`GET /mj/task/{id}/fetch` -> {status, progress: "37%", imageUrl, failReason}; the image is one
2x2 grid."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.stubs.common import Recorded, StubState, make_image, scripted

IMAGINE_FIELDS = {"prompt", "base64Array", "notifyHook", "state"}
# The progress a task reports on each successive fetch before SUCCESS.
PROGRESS = ("0%", "37%", "81%")


@dataclass
class MJTask:
    id: str
    prompt: str
    outcome: str = "SUCCESS"
    fetches: int = 0


def banned(word: str = "forbidden") -> dict[str, Any]:
    return {
        "code": 24,
        "description": "可能包含敏感词",
        "properties": {"promptEn": f"a {word} picture", "bannedWord": word},
        "result": None,
    }


class MidjourneyStub:
    def __init__(self, *, secret: str = "mj-test-secret") -> None:
        self.secret = secret
        self.state = StubState()
        self.url = ""  # set by tests.stubs.fixtures.live
        self.tasks: dict[str, MJTask] = {}
        self._ids = itertools.count(1_700_000_000_000)
        self.app = Starlette(
            routes=[
                Route("/mj/submit/imagine", self.imagine, methods=["POST"]),
                Route("/mj/task/{task_id}/fetch", self.fetch, methods=["GET"]),
                Route("/attachments/{task_id}/grid.png", self.image, methods=["GET"]),
            ]
        )

    def _authorised(self, request: Request) -> bool:
        return request.headers.get("mj-api-secret") == self.secret

    async def imagine(self, request: Request) -> Response:
        state = self.state
        try:
            body = await request.json()
        except ValueError:
            body = None
        state.record(
            Recorded("imagine", "POST", request.url.path, dict(request.headers), json=body)
        )
        problems = self._wire_rules(body)
        if problems:
            state.reject(f"imagine: {problems}")
            return JSONResponse({"code": 4, "description": "; ".join(problems), "result": None})
        if not self._authorised(request):
            return JSONResponse({"code": 401, "description": "unauthorized"}, status_code=401)
        answer, step = await scripted(state, "imagine")
        if answer is not None:
            return answer
        if step is not None and step.variant == "banned":
            return JSONResponse(banned())
        outcome = state.next_step("task")
        task = MJTask(
            id=str(next(self._ids)),
            prompt=body["prompt"],
            outcome=outcome.variant if outcome is not None and outcome.variant else "SUCCESS",
        )
        self.tasks[task.id] = task
        return JSONResponse(
            {"code": 1, "description": "Submit success", "result": task.id, "properties": {}}
        )

    async def fetch(self, request: Request) -> Response:
        state = self.state
        task_id = request.path_params["task_id"]
        state.record(Recorded("fetch", "GET", request.url.path, dict(request.headers)))
        if not self._authorised(request):
            return JSONResponse({"code": 401, "description": "unauthorized"}, status_code=401)
        answer, _ = await scripted(state, "fetch")
        if answer is not None:
            return answer
        task = self.tasks.get(task_id)
        if task is None:
            return JSONResponse(None)
        task.fetches += 1
        base = {"id": task.id, "action": "IMAGINE", "prompt": task.prompt, "promptEn": task.prompt}
        if task.fetches <= len(PROGRESS):
            status = "SUBMITTED" if task.fetches == 1 else "IN_PROGRESS"
            return JSONResponse(
                base | {"status": status, "progress": PROGRESS[task.fetches - 1], "imageUrl": None}
            )
        if task.outcome == "FAILURE":
            return JSONResponse(
                base
                | {"status": "FAILURE", "progress": "0%", "failReason": "Banned prompt detected"}
            )
        host = str(request.base_url).rstrip("/")
        return JSONResponse(
            base
            | {
                "status": "SUCCESS",
                "progress": "100%",
                "imageUrl": f"{host}/attachments/{task.id}/grid.png",
                "failReason": None,
            }
        )

    async def image(self, request: Request) -> Response:
        task = self.tasks.get(request.path_params["task_id"])
        self.state.record(Recorded("image", "GET", request.url.path, dict(request.headers)))
        if task is None:
            return Response(status_code=404)
        match = re.search(r"--ar (\d+):(\d+)", task.prompt)
        a, b = (int(match.group(1)), int(match.group(2))) if match else (1, 1)
        # A 2x2 grid of four ~512px candidates at the requested aspect ratio.
        width = round(math.sqrt(512 * 512 * a / b)) * 2
        height = round(width * b / a)
        return Response(make_image(width, height, task.prompt), media_type="image/png")

    @staticmethod
    def _wire_rules(body: Any) -> list[str]:
        if not isinstance(body, dict):
            return ["body must be a JSON object"]
        problems = []
        if set(body) != IMAGINE_FIELDS:
            problems.append(f"fields must be {sorted(IMAGINE_FIELDS)}, got {sorted(body)}")
        if not isinstance(body.get("prompt"), str) or not body.get("prompt"):
            problems.append("prompt must be a non-empty string")
        if body.get("base64Array") != [] or body.get("notifyHook") != "" or body.get("state") != "":
            problems.append("base64Array, notifyHook and state must be [], '' and ''")
        prompt = str(body.get("prompt", ""))
        if not re.search(r"--ar \d+:\d+", prompt) or not re.search(r"--seed \d+", prompt):
            problems.append("prompt must carry --ar W:H and --seed N")
        no = prompt.find("--no ")
        if no != -1 and "--" in prompt[no + 5 :]:
            problems.append("--no must be the last parameter")
        return problems
