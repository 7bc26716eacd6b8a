"""Per-key limits on a live server: each API key may carry a name, a request rate, a daily image
quota and a daily USD cap. Past one, 429 with Retry-After and a code saying which limit; the
counts come from the ledger (they outlive a restart) and include work still running, so a
burst cannot slip past them. One key's flood never starves another key's requests."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_server import fresh_data_dir, live_server, tiny_settings, watched_server

SMALL = {"prompt": "a paper crane", "size": "64x64", "steps": 2}
DAY_S = 86400


def _keys(*tables: dict[str, Any]) -> list[Any]:
    return [*tables, "sk-plain"]


def _refused(response: httpx.Response, code: str) -> int:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == code, response.text
    retry = int(response.headers["Retry-After"])
    assert retry >= 1
    return retry


def test_requests_per_minute_counts_work_requests_per_key(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    keys = _keys({"key": "sk-rpm", "name": "rpm", "requests_per_minute": 3})
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir), api_keys=keys)
    with live_server(settings) as server, server.client("sk-rpm") as client:
        seeds = iter(range(100))
        statuses = [
            client.post("/v1/images/generations", json={**SMALL, "seed": next(seeds)}).status_code
            for _ in range(3)
        ]
        assert statuses == [200] * 3
        # Reads ask for no work and do not count.
        assert client.get("/v1/models").status_code == 200
        refused = client.post("/v1/images/generations", json={**SMALL, "seed": next(seeds)})
        assert _refused(refused, "rate_limit_requests") <= 60
        assert "3 requests per minute" in refused.json()["error"]["message"]
        # A1111's routes answer in A1111's shape, with the same code.
        a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2})
        assert a1111.status_code == 429 and a1111.json()["error"] == "rate_limit_requests"
        # Another key has its own count (none).
        with server.client("sk-plain") as other:
            assert other.post("/v1/images/generations", json=SMALL).status_code == 200


def test_images_per_day_counts_generated_images_and_survives_a_restart(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    keys = _keys({"key": "sk-img", "name": "images", "images_per_day": 3})
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir), api_keys=keys)
    with live_server(settings) as server, server.client("sk-img") as client:
        post = client.post
        assert post("/v1/images/generations", json={**SMALL, "n": 2, "seed": 1}).status_code == 200
        over = post("/v1/images/generations", json={**SMALL, "n": 2, "seed": 10})
        assert _refused(over, "quota_images") <= DAY_S
        assert "3 images" in over.json()["error"]["message"]
        assert post("/v1/images/generations", json={**SMALL, "seed": 20}).status_code == 200
        # Full: a new image is refused, a cache hit is free and still served.
        _refused(post("/v1/images/generations", json={**SMALL, "seed": 30}), "quota_images")
        hit = post("/v1/images/generations", json={**SMALL, "n": 2, "seed": 1})
        assert hit.status_code == 200 and hit.json()["imagegen"]["cached"]
        # A job is refused at submission, with no job created.
        _refused(post("/v1/jobs", json={**SMALL, "seed": 40}), "quota_images")
        # The ledger books each row under the key's name.
        callers = {row["caller"] for row in server.service.ledger.rows()}
        assert callers == {"key:images"}
        with server.client("sk-plain") as other:
            assert other.post("/v1/images/generations", json=SMALL).status_code == 200
    # The day's count is the ledger's: a restart does not reset it.
    with live_server(settings) as server, server.client("sk-img") as client:
        again = client.post("/v1/images/generations", json={**SMALL, "seed": 50})
        _refused(again, "quota_images")


def test_usd_per_day_stops_a_key_before_its_cap(tmp_path: Path, tiny_models_dir: Path) -> None:
    """The model's rate is measured first (a run of another key, in the ledger); the GPU-hour
    price is then set so one image costs about a quarter of the key's cap. The key is served
    until what it has spent plus the next request's estimate would pass the cap, then 429
    `quota_usd`; it can pass the cap only by what the last request cost over its estimate."""
    cap = 1.0
    data = fresh_data_dir(tmp_path, tiny_models_dir)
    with live_server(tiny_settings(data)) as server, server.client() as client:
        for seed in range(3):
            assert client.post("/v1/images/generations", json={**SMALL, "seed": seed}).is_success
        seconds = server.service.ledger.seconds_per_image("tiny-sdxl")
    assert seconds is not None and seconds > 0
    keys = _keys({"key": "sk-usd", "name": "spender", "usd_per_day": cap})
    per_hour = cap / 4 / seconds * 3600
    settings = tiny_settings(data, api_keys=keys, top={"cost": {"usd_per_gpu_hour": per_hour}})
    with live_server(settings) as server, server.client("sk-usd") as client:
        served = 0
        for seed in range(100, 140):
            response = client.post("/v1/images/generations", json={**SMALL, "seed": seed})
            if response.status_code != 200:
                break
            served += 1
        else:
            pytest.fail("the cap never stopped the key")
        _refused(response, "quota_usd")
        assert "$1.00" in response.json()["error"]["message"]
        rows = [r for r in server.service.ledger.rows() if r["caller"] == "key:spender"]
        spent = sum(r["cost_usd"] for r in rows)
        assert served >= 1 and len(rows) == served
        assert 0 < spent - rows[0]["cost_usd"] <= cap  # before the last one, within the cap
        with server.client("sk-plain") as other:
            assert other.post("/v1/images/generations", json=SMALL).status_code == 200


def test_a_burst_cannot_slip_past_a_daily_quota(tmp_path: Path, tiny_models_dir: Path) -> None:
    """Five requests at once against a quota of three, the device held: the running ones
    count, so exactly three are admitted and two refused, though none is booked yet."""
    keys = _keys({"key": "sk-burst", "name": "burst", "images_per_day": 3})
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir), api_keys=keys)
    with live_server(settings) as server:
        release = threading.Event()
        worker = server.service.registry.worker
        worker.call(release.wait)

        def post(seed: int) -> httpx.Response:
            with server.client("sk-burst") as own:
                return own.post("/v1/images/generations", json={**SMALL, "seed": seed})

        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(post, seed) for seed in range(5)]
            # While the device is held, three wait in the queue and two are answered.
            assert _wait_for(lambda: sum(f.done() for f in futures) == 2)
            assert worker.queued_images() == 3
            refused = [f.result() for f in futures if f.done()]
            release.set()
            responses = [f.result(timeout=60) for f in futures]
        for response in refused:
            _refused(response, "quota_images")
        assert sorted(r.status_code for r in responses) == [200, 200, 200, 429, 429]


def test_one_keys_flood_takes_turns_with_another_key(tmp_path: Path, tiny_models_dir: Path) -> None:
    """Key A queues four requests, then key B one: B's runs second, not fifth, and A's run in
    the order A sent them (one image per batch, so the order is visible)."""
    keys = ["sk-a", "sk-b"]
    settings = tiny_settings(
        fresh_data_dir(tmp_path, tiny_models_dir),
        api_keys=keys,
        local={"max_batch_size": 1, "batch_window_ms": 0},
    )
    with watched_server(settings) as (server, runner):
        worker = server.service.registry.worker
        release = threading.Event()
        worker.call(release.wait)

        def post(key: str, prompt: str) -> httpx.Response:
            with server.client(key) as own:
                return own.post("/v1/images/generations", json={**SMALL, "prompt": prompt})

        with ThreadPoolExecutor(5) as pool:
            futures = []
            for i in range(4):
                futures.append(pool.submit(post, "sk-a", f"a {i}"))
                assert _wait_for(lambda i=i: worker.queued_images() == i + 1)
            futures.append(pool.submit(post, "sk-b", "b 0"))
            assert _wait_for(lambda: worker.queued_images() == 5)
            release.set()
            assert [f.result(timeout=60).status_code for f in futures] == [200] * 5
        ran = [p for p in runner.prompts if p in {"a 0", "a 1", "a 2", "a 3", "b 0"}]
        assert ran == ["a 0", "b 0", "a 1", "a 2", "a 3"]


def test_failed_key_checks_lock_the_address_out_for_the_minute(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    settings = tiny_settings(
        fresh_data_dir(tmp_path, tiny_models_dir),
        api_keys=["sk-right"],
        auth_failures_per_minute=3,
    )
    with live_server(settings) as server:
        with server.client("sk-wrong") as wrong:
            assert [wrong.get("/v1/models").status_code for _ in range(3)] == [401] * 3
            locked = wrong.get("/v1/models")
        assert _refused(locked, "too_many_failed_auth") <= 60
        # Locked means locked: a right key from the address is refused too (else the 429s
        # would tell a guesser nothing and the 200 would still confirm a guess)...
        with server.client("sk-right") as right:
            _refused(right.get("/v1/models"), "too_many_failed_auth")
        # ...while the probes, which need no key, still answer.
        with server.client() as anonymous:
            assert anonymous.get("/livez").status_code == 200


def _wait_for(condition: Any, deadline_s: float = 30.0) -> bool:
    done = threading.Event()
    waited = 0.0
    while not condition():
        if waited >= deadline_s:
            return False
        done.wait(0.01)
        waited += 0.01
    return True
