"""The scheduler seen through a live server: concurrent requests share pipeline calls and still
match their solo pixels, the queue bound (in images) answers 429 with Retry-After beyond it,
and a client that leaves while queued never reaches the pipeline (the device held by a
WatchedRunner injected through BackendRegistry(wrap_runner=...))."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from tests.helpers_server import (
    LiveServer,
    WatchedRunner,
    fresh_data_dir,
    live_server,
    metric_value,
    tiny_settings,
    watched_server,
)

DEADLINE_S = 60  # only stops a hung test


@pytest.fixture(scope="module")
def watched(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[tuple[LiveServer, WatchedRunner]]:
    """Cache off (a zero byte cap evicts every entry at once) so that repeating a request
    really runs it again; a window long enough to gather eight requests into one batch."""
    data = fresh_data_dir(tmp_path_factory.mktemp("scheduler"), tiny_models_dir)
    settings = tiny_settings(
        data,
        local={"batch_window_ms": 100, "max_batch_size": 8},
        top={"cache_max_bytes": 0},
    )
    with watched_server(settings) as watched:
        yield watched


def pixels(item: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.int16]]:
    with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def pipeline_calls(client: httpx.Client) -> float:
    return metric_value(client.get("/metrics").text, "imagegen_pipeline_calls_total")


def test_concurrent_requests_share_pipeline_calls_and_match_solo_runs(server: LiveServer) -> None:
    bodies = [
        {"prompt": f"a harbour at dawn, variation {i}", "seed": 1000 + 17 * i, "steps": 3}
        for i in range(8)
    ]
    with server.client() as client:
        calls_before = pipeline_calls(client)

    def post(body: dict[str, Any]) -> dict[str, Any]:
        with server.client() as own:
            response = own.post("/v1/images/generations", json=body)
            assert response.status_code == 200, response.text
            return dict(response.json())

    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(post, bodies))
    with server.client() as client:
        calls_together = pipeline_calls(client) - calls_before
        assert calls_together < len(bodies)
        text = client.get("/metrics").text
        assert metric_value(text, "imagegen_batch_size_images_sum") > metric_value(
            text, "imagegen_batch_size_images_count"
        )
        for body, batched in zip(bodies, together, strict=True):
            assert batched["imagegen"]["cached"] is False
            alone = client.post("/v1/images/generations", json=body).json()
            assert alone["imagegen"]["cached"] is False
            assert alone["data"][0]["seed"] == batched["data"][0]["seed"] == body["seed"]
            difference = np.abs(pixels(alone["data"][0]) - pixels(batched["data"][0])).max()
            assert difference <= 1, (body["prompt"], difference)


def test_queue_bound_in_images_answers_429_beyond_it(tmp_path: Path, tiny_models_dir: Path) -> None:
    """Q = 3 images of queue and a worker held busy (its control channel blocks on an Event:
    the one place a test forces blocking): exactly the requests beyond Q are refused."""
    settings = tiny_settings(
        fresh_data_dir(tmp_path, tiny_models_dir),
        local={"max_queue_images": 3, "batch_window_ms": 0},
    )
    with live_server(settings) as live:
        release = threading.Event()
        live.service.registry.worker.call(release.wait)
        bodies = [{"prompt": f"crowd {i}", "steps": 2, "n": 1} for i in range(5)]
        results: list[httpx.Response] = []
        lock = threading.Lock()

        def post(body: dict[str, Any]) -> None:
            with live.client() as client:
                response = client.post("/v1/images/generations", json=body)
            with lock:
                results.append(response)

        threads = [threading.Thread(target=post, args=(b,)) for b in bodies]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(results) < 2:
            time.sleep(0.02)
        refused = list(results)
        assert len(refused) == 2
        for response in refused:
            assert response.status_code == 429
            assert response.headers["Retry-After"].isdigit()
            assert int(response.headers["Retry-After"]) >= 1
            error = response.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        # A request of n=2 counts two images: it does not fit either.
        with live.client() as client:
            wide = client.post("/v1/images/generations", json={"prompt": "wide", "n": 2})
            assert wide.status_code == 429
        release.set()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(r.status_code for r in results) == [200, 200, 200, 429, 429]


def test_client_that_leaves_while_queued_never_reaches_the_pipeline(
    server: LiveServer, device: WatchedRunner
) -> None:
    with server.client() as client:
        stats_before = client.get("/v1/stats").json()["requests"]
        left_before = left_early(client)
        device.hold()
        try:
            busy = client.post("/v1/jobs", json={"prompt": "keeps the device busy", "steps": 2})
            busy_id = busy.json()["id"]
            assert device.holding.wait(DEADLINE_S), "the busy job never reached the device"
            # A raw connection, so that the test decides when the client leaves: once its
            # request is queued behind the held batch.
            address = urlsplit(server.url)
            with socket.create_connection(
                (address.hostname, address.port), timeout=DEADLINE_S
            ) as impatient:
                impatient.sendall(_post_request("/v1/images/generations", IMPATIENT))
                wait_until(lambda: queue_depth(client) == 1, "the impatient request to queue")
            wait_until(lambda: queue_depth(client) == 0, "the queue to drop the impatient request")
            wait_until(lambda: left_early(client) > left_before, "the 499 of the one who left")
        finally:
            device.release()
        wait_until(
            lambda: client.get(f"/v1/jobs/{busy_id}").json()["status"] == "succeeded",
            "the busy job to finish",
        )
        # The queue was empty when the device was released, so nothing else can run now.
        assert "the impatient client" not in device.prompts
        assert "keeps the device busy" in device.prompts
        assert client.get("/v1/stats").json()["requests"] == stats_before + 1


IMPATIENT = {"prompt": "the impatient client", "steps": 2}


def _post_request(path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def queue_depth(client: httpx.Client) -> float:
    return metric_value(client.get("/metrics").text, "imagegen_queue_depth_images")


def left_early(client: httpx.Client) -> float:
    return metric_value(client.get("/metrics").text, "imagegen_requests_total", status="499")


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition`; the deadline only stops a hung test."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)
