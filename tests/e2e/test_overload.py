"""Overload is not failure: a burst past the local queue bound gets 429s with Retry-After, and
never opens the circuit breaker (which used to turn later requests into 502 "circuit open")."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx

from tests.helpers_server import fresh_data_dir, live_server, tiny_settings

QUEUE_IMAGES = 4
BURST = 11


def test_a_burst_past_the_queue_is_429_never_502(tmp_path: Path, tiny_models_dir: Path) -> None:
    settings = tiny_settings(
        fresh_data_dir(tmp_path, tiny_models_dir), local={"max_queue_images": QUEUE_IMAGES}
    )
    with live_server(settings) as server, server.client() as client:
        # Hold the device so the queue fills deterministically: four requests wait in it,
        # every other one finds it full.
        release = threading.Event()
        server.service.registry.worker.call(release.wait)
        body = {"prompt": "a red kite", "size": "64x64", "steps": 2}

        def post(i: int) -> httpx.Response:
            with server.client() as own:
                return own.post("/v1/images/generations", json={**body, "seed": i})

        with ThreadPoolExecutor(BURST) as pool:
            futures = [pool.submit(post, i) for i in range(BURST)]
            # The refused ones answer while the device is still held...
            finished = as_completed(futures, timeout=60)
            first = [next(finished) for _ in range(BURST - QUEUE_IMAGES)]
            refused = [f.result() for f in first]
            # ...and more requests past the breaker's threshold still get 429, not 502.
            late = [client.post("/v1/images/generations", json=body) for _ in range(4)]
            release.set()
            served = [f.result(timeout=60) for f in futures if f not in first]
        statuses = [r.status_code for r in refused + late]
        assert statuses == [429] * len(statuses), statuses
        for response in refused + late:
            assert response.json()["error"]["code"] == "queue_full"
            assert int(response.headers["Retry-After"]) >= 1
        assert [r.status_code for r in served] == [200] * QUEUE_IMAGES
        # The circuit for `local` stayed closed: the next request is served.
        after = client.post("/v1/images/generations", json=body)
        assert after.status_code == 200, after.text
