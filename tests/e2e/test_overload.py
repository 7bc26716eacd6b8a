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


def test_the_bound_counts_estimated_device_seconds_not_only_images(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    """One 128x128 30-step request costs what 60 64x64 2-step ones do: with a bound of 3.5
    small requests' worth of device-seconds (local.max_queue_seconds, priced at the model's
    measured rate), exactly three small ones queue, the fourth is refused, and so is the big
    one, though the image bound (64) is far off. Alone in the queue, the big one is taken."""
    from models.local.worker import Demand

    settings = tiny_settings(
        fresh_data_dir(tmp_path, tiny_models_dir), local={"batch_window_ms": 0}
    )
    small = {"prompt": "a small kite", "size": "64x64", "steps": 2}
    big = {"prompt": "a big kite", "size": "128x128", "steps": 30}
    with live_server(settings) as server, server.client() as client:
        worker = server.service.registry.worker
        assert client.post("/v1/images/generations", json={**small, "seed": 0}).status_code == 200
        cost = worker.estimate_s(Demand("tiny-sdxl", 1, 2 * 64 * 64 / 1e6))
        assert cost is not None and cost > 0  # measured by that first request
        worker.max_queue_seconds = 3.5 * cost
        release = threading.Event()
        worker.call(release.wait)  # the device is busy until released: nothing drains

        def post(body: dict[str, object]) -> httpx.Response:
            with server.client() as own:
                return own.post("/v1/images/generations", json=body)

        with ThreadPoolExecutor(4) as pool:
            queued = []
            for seed in (1, 2, 3):
                queued.append(pool.submit(post, {**small, "seed": seed}))
                while worker.queued_images() < seed:  # in order, one after another
                    threading.Event().wait(0.01)
            refused = [client.post("/v1/images/generations", json={**small, "seed": 4})]
            refused.append(client.post("/v1/images/generations", json={**big, "seed": 5}))
            release.set()
            served = [f.result(timeout=60) for f in queued]
        for response in refused:
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "queue_full"
            assert "max_queue_seconds" in response.json()["error"]["message"]
            assert int(response.headers["Retry-After"]) >= 1
        assert [r.status_code for r in served] == [200] * 3
        # Alone in the queue, the big one is taken whatever it costs; the breaker is closed.
        alone = client.post("/v1/images/generations", json={**big, "seed": 5})
        assert alone.status_code == 200, alone.text


def test_a_fallback_serves_what_the_local_queue_cannot_and_says_so(
    tmp_path: Path, tiny_models_dir: Path, stub: object
) -> None:
    """tiny-sdxl falls back to gpt-image-2 (OpenAI's API on loopback): with the local queue
    full, the next request is served by the fallback and names why; nothing is refused."""
    from tests.e2e.conftest import OPENAI_KEY
    from tests.stubs.fixtures import FAST

    providers = {"openai": {"base_url": stub.url, "api_key": OPENAI_KEY, **FAST}}  # type: ignore[attr-defined]
    settings = tiny_settings(
        fresh_data_dir(tmp_path, tiny_models_dir),
        local={"max_queue_images": 1, "batch_window_ms": 0},
        top={"providers": providers, "fallbacks": {"tiny-sdxl": ["gpt-image-2"]}},
    )
    body = {"model": "tiny-sdxl", "prompt": "a red kite", "size": "1024x1024", "steps": 2}
    with live_server(settings) as server, server.client() as client:
        worker = server.service.registry.worker
        release = threading.Event()
        worker.call(release.wait)
        with ThreadPoolExecutor(1) as pool:
            local = pool.submit(
                lambda: server.client().post(
                    "/v1/images/generations", json={**body, "size": "64x64", "seed": 1}
                )
            )
            while worker.queued_images() < 1:
                threading.Event().wait(0.01)
            overflow = client.post("/v1/images/generations", json={**body, "seed": 2})
            release.set()
            assert local.result(timeout=60).status_code == 200
    assert overflow.status_code == 200, overflow.text
    info = overflow.json()["imagegen"]
    assert (info["model"], info["provider"]) == ("gpt-image-2", "openai")
    assert any("tiny-sdxl" in notice and "queue" in notice for notice in info["notices"])
