"""Single flight in one process: identical seeded requests at the same moment make the image
once and bill it once; the others wait and are answered from the cache, booked as hits with
what they saved. A leader that gives up hands the work to a follower."""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.helpers_server import fresh_data_dir, tiny_settings, watched_server

BODY = {"prompt": "a lighthouse at dusk", "size": "64x64", "steps": 3, "seed": 7}
DEADLINE_S = 60


def _digest(response: httpx.Response) -> str:
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    return hashlib.sha256(data).hexdigest()


def test_identical_seeded_requests_generate_once(tmp_path: Path, tiny_models_dir: Path) -> None:
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir))
    with watched_server(settings) as (server, runner):
        first = len(runner.batches)  # after the start-up warm-up
        runner.hold()  # the first batch holds mid-run while the others arrive

        def post(_: int) -> httpx.Response:
            with server.client() as own:
                return own.post("/v1/images/generations", json=BODY)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, i) for i in range(8)]
            # Those that arrive while it runs wait for it; any later is a plain cache hit.
            assert runner.holding.wait(DEADLINE_S)
            runner.release()
            responses = [f.result(timeout=DEADLINE_S) for f in futures]
        assert [r.status_code for r in responses] == [200] * 8
        assert len({_digest(r) for r in responses}) == 1
        # One image reached the device (without single flight the eight would have run as
        # one batch of eight images).
        assert [batch.images for batch in runner.batches[first:]] == [1]
        rows = server.service.ledger.rows()
        generated = [r for r in rows if not r["cached"]]
        hits = [r for r in rows if r["cached"]]
        assert len(generated) == 1 and generated[0]["cost_usd"] > 0
        assert len(hits) == 7
        assert all(r["cost_usd"] == 0 and r["saved_usd"] == generated[0]["cost_usd"] for r in hits)
        assert sum(r.json()["imagegen"]["cached"] for r in responses) == 7


def test_a_leader_that_gives_up_hands_the_work_to_a_follower(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    """The leader's deadline passes while its batch is held: it answers 504 and books nothing;
    the follower, waiting on it, finds no cache entry and runs the request itself, once."""
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir))
    with watched_server(settings) as (server, runner):
        runner.hold()

        def post(body: dict[str, Any]) -> httpx.Response:
            with server.client() as own:
                return own.post("/v1/images/generations", json=body)

        with ThreadPoolExecutor(2) as pool:
            leader = pool.submit(post, {**BODY, "timeout": 2})
            assert runner.holding.wait(DEADLINE_S)
            follower = pool.submit(post, BODY)
            assert leader.result(timeout=DEADLINE_S).status_code == 504
            runner.release()
            answered = follower.result(timeout=DEADLINE_S)
        assert answered.status_code == 200, answered.text
        assert not answered.json()["imagegen"]["cached"]
        rows = server.service.ledger.rows()
        assert [(r["cached"], r["status"]) for r in rows] == [(0, "ok")]
