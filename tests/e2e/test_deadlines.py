"""Deadlines: a request past its `timeout` (or X-Request-Timeout, or server.request_timeout_s)
is a 504 `timeout` in the error envelope; its batch is cancelled at the next denoising step,
nothing is cached or booked, and the next request is served. The device is held mid-batch by
WatchedRunner (the one forced part); the server, the pipeline and the client are real."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers_server import (
    LiveServer,
    WatchedRunner,
    fresh_data_dir,
    tiny_settings,
    watched_server,
)

DEADLINE_S = 60  # only stops a hung test
BODY = {"prompt": "a slow lighthouse", "size": "64x64", "steps": 40, "seed": 5}


@pytest.fixture(scope="module")
def watched(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[tuple[LiveServer, WatchedRunner]]:
    data = fresh_data_dir(tmp_path_factory.mktemp("deadlines"), tiny_models_dir)
    with watched_server(tiny_settings(data, request_timeout_s=30)) as live:
        yield live


def _held_past_deadline(
    server: LiveServer, device: WatchedRunner, **send: object
) -> httpx.Response:
    """Send a request while the device holds its batch after the first step; answer once the
    deadline has passed, then let the device go on."""
    device.hold()
    answer: list[httpx.Response] = []

    def post() -> None:
        with server.client(timeout=DEADLINE_S) as http:
            answer.append(http.post("/v1/images/generations", **send))  # type: ignore[arg-type]

    thread = threading.Thread(target=post)
    thread.start()
    try:
        assert device.holding.wait(DEADLINE_S), "the batch never started"
        thread.join(DEADLINE_S)
    finally:
        device.release()
    (response,) = answer
    return response


def test_past_its_timeout_a_request_is_504_and_its_work_is_cancelled(
    watched: tuple[LiveServer, WatchedRunner],
) -> None:
    server, device = watched
    with server.client() as http:
        booked = http.get("/v1/stats").json()["requests"]
    response = _held_past_deadline(server, device, json={**BODY, "timeout": 0.5})
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("timeout", "timeout")
    assert "0.5 s" in error["message"]
    with server.client(timeout=DEADLINE_S) as http:
        # The next request is served (it waits for the cancelled batch to stop, at its next
        # step after the hold)...
        assert http.post("/v1/images/generations", json={**BODY, "steps": 2}).status_code == 200
        cancelled = device.batches[-2]
        assert cancelled.prompts == [BODY["prompt"]] and cancelled.steps < BODY["steps"]
        # ...nothing was booked for the cancelled one, and nothing cached: the same request
        # with time to finish runs on the device.
        assert http.get("/v1/stats").json()["requests"] == booked + 1
        again = http.post("/v1/images/generations", json=BODY)
        assert again.status_code == 200 and again.json()["imagegen"]["cached"] is False


def test_the_header_and_the_server_setting_are_deadlines_too(
    watched: tuple[LiveServer, WatchedRunner],
) -> None:
    server, device = watched
    response = _held_past_deadline(
        server, device, json={**BODY, "seed": 6}, headers={"X-Request-Timeout": "0.5"}
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    # The shortest wins: the server's 30 s does not stretch a request's own 0.5 s, and a
    # request's own cannot stretch the server's (min of both).
    assert server.state.serving.deadline_s({"x-request-timeout": "100"}, 50) == 30
    assert server.state.serving.deadline_s({}, None, server_wide=False) is None
    with server.client() as http:
        bad = http.post("/v1/images/generations", json=BODY, headers={"X-Request-Timeout": "soon"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "timeout"
        zero = http.post("/v1/images/generations", json={**BODY, "timeout": 0})
        assert zero.status_code == 400 and zero.json()["error"]["param"] == "timeout"


def test_a1111_requests_take_the_header_in_their_own_error_shape(
    watched: tuple[LiveServer, WatchedRunner],
) -> None:
    server, device = watched
    device.hold()
    answer: list[httpx.Response] = []

    def post() -> None:
        with server.client(timeout=DEADLINE_S) as http:
            answer.append(
                http.post(
                    "/sdapi/v1/txt2img",
                    json={"prompt": "a slow boat", "width": 64, "height": 64, "steps": 40},
                    headers={"X-Request-Timeout": "0.5"},
                )
            )

    thread = threading.Thread(target=post)
    thread.start()
    try:
        assert device.holding.wait(DEADLINE_S)
        thread.join(DEADLINE_S)
    finally:
        device.release()
    (response,) = answer
    assert response.status_code == 504
    body = response.json()
    assert body["error"] == "timeout" and "deadline" in body["detail"]
