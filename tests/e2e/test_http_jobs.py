"""The async job API: 202 with a queue position, state and progress, server-sent events (a late
client gets the current state first), cancel while queued or running, and job records that
survive a restart (in-flight ones read as interrupted)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.helpers_server import (
    LiveServer,
    WatchedRunner,
    fresh_data_dir,
    live_server,
    metric_value,
    start_server,
    tiny_settings,
    watched_server,
)

LONG = 200  # steps (the most the service takes): seconds of work, stopped early by each test
DEADLINE_S = 60  # only stops a hung test


@pytest.fixture(scope="module")
def watched(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[tuple[LiveServer, WatchedRunner]]:
    data = fresh_data_dir(tmp_path_factory.mktemp("jobs"), tiny_models_dir)
    with watched_server(tiny_settings(data)) as watched:
        yield watched


def events(client: httpx.Client, job_id: str, *, until: str | None = None) -> list[tuple[str, Any]]:
    """(event, data) pairs from the job's SSE stream, to its end or the first `until`."""
    found: list[tuple[str, Any]] = []
    kind = ""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                found.append((kind, json.loads(line.removeprefix("data: "))))
                if kind == until:
                    break
    return found


def wait_status(
    client: httpx.Client, job_id: str, status: str, timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == status or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


def queue_position(client: httpx.Client, job_id: str, timeout: float = 30) -> int | None:
    """The job's place once the device queue has reported it (POST answers before that)."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["queue_position"] is not None or job["status"] != "queued":
            return job["queue_position"]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def pipeline_calls(client: httpx.Client, *, at_least: float = 0, timeout: float = 60) -> float:
    """The pipeline-call counter, once it reaches `at_least` (a batch is counted just after
    its results are handed out) or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        calls = metric_value(client.get("/metrics").text, "imagegen_pipeline_calls_total")
        if calls >= at_least or time.monotonic() > deadline:
            return calls
        time.sleep(0.05)


def test_job_runs_to_completion_with_events(server: LiveServer) -> None:
    with server.client() as client:
        created = client.post("/v1/jobs", json={"prompt": "a tram", "seed": 9, "steps": 3})
        assert created.status_code == 202, created.text
        job = created.json()
        assert set(job) >= {"id", "status", "queue_position"}
        assert job["status"] in ("queued", "running", "succeeded")
        seen = events(client, job["id"])
        kinds = [kind for kind, _ in seen]
        assert kinds[-1] == "completed"
        result = seen[-1][1]["result"]
        assert set(result) >= {"created", "data", "imagegen"}
        assert result["data"][0]["seed"] == 9 and result["data"][0]["b64_json"]

        final = client.get(f"/v1/jobs/{job['id']}").json()
        assert final["status"] == "succeeded"
        assert final["result"]["data"][0]["b64_json"] == result["data"][0]["b64_json"]

        # A client that connects after the end is told the outcome at once.
        late = events(client, job["id"])
        assert [kind for kind, _ in late] == ["completed"]


def test_progress_is_reported(server: LiveServer) -> None:
    with server.client() as client:
        job = client.post("/v1/jobs", json={"prompt": "a kettle", "steps": 6}).json()
        seen = events(client, job["id"])
        progress = [data for kind, data in seen if kind == "progress"]
        # A late subscriber may miss early steps, never the end.
        assert progress and progress[-1] == {**progress[-1], "step": 6, "total": 6}
        assert client.get(f"/v1/jobs/{job['id']}").json()["progress"] == {"step": 6, "total": 6}


def test_cancel_a_running_job_stops_the_batch(server: LiveServer, device: WatchedRunner) -> None:
    with server.client() as client:
        before = client.get("/v1/stats").json()["requests"]
        first = len(device.batches)
        device.hold()  # cancelled mid-run, however fast the host runs LONG steps
        try:
            job = client.post("/v1/jobs", json={"prompt": "a slow river", "steps": LONG}).json()
            started = events(client, job["id"], until="progress")
            assert started[-1][0] == "progress"
            assert device.holding.wait(DEADLINE_S)
            cancelled = client.delete(f"/v1/jobs/{job['id']}")
            assert cancelled.status_code == 200
            assert cancelled.json()["status"] == "cancelled"
        finally:
            device.release()
        quick = client.post("/v1/images/generations", json={"prompt": "next", "steps": 2})
        assert quick.status_code == 200
        # The device stopped at the step after the cancel, not after all LONG of them.
        cancelled_batch, quick_batch = device.batches[first:]
        assert (cancelled_batch.prompts, quick_batch.prompts) == (["a slow river"], ["next"])
        assert 1 <= cancelled_batch.steps < LONG
        late = events(client, job["id"])
        assert [kind for kind, _ in late] == ["cancelled"]
        # Cancelled work is neither billed nor cached: only the quick request reached the ledger.
        assert client.get("/v1/stats").json()["requests"] == before + 1


def test_cancel_a_queued_job_before_it_runs(server: LiveServer, device: WatchedRunner) -> None:
    with server.client() as client:
        calls = pipeline_calls(client)
        running = client.post("/v1/jobs", json={"prompt": "busy", "steps": LONG}).json()
        events(client, running["id"], until="progress")
        # Another key (steps differ), so it waits in the queue behind the running batch.
        queued = client.post("/v1/jobs", json={"prompt": "waiting", "steps": 3}).json()
        assert queued["status"] == "queued"
        assert queue_position(client, queued["id"]) == 1
        assert client.delete(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
        assert client.delete(f"/v1/jobs/{running['id']}").json()["status"] == "cancelled"
        assert wait_status(client, queued["id"], "cancelled")["status"] == "cancelled"
        # The running batch stops at its next step and counts as one pipeline call...
        pipeline_calls(client, at_least=calls + 1)
        # ...and the queued job never ran: a request sent now queues behind anything left,
        # so once it is served, whatever was still queued has reached the device too.
        after = client.post("/v1/images/generations", json={"prompt": "after", "steps": 2})
        assert after.status_code == 200
        assert "waiting" not in device.prompts
        assert pipeline_calls(client, at_least=calls + 2) == calls + 2


def test_cancelling_one_job_of_a_batch_keeps_the_other(server: LiveServer) -> None:
    with server.client() as client:
        before = client.get("/v1/stats").json()["requests"]
        busy = client.post("/v1/jobs", json={"prompt": "busy", "steps": LONG}).json()
        events(client, busy["id"], until="progress")
        # Both wait behind the busy batch, so they leave the queue together as one batch.
        body = {"steps": 20, "guidance_scale": 4.0}
        keep = client.post("/v1/jobs", json={"prompt": "keep", **body}).json()
        drop = client.post("/v1/jobs", json={"prompt": "drop", **body}).json()
        places = (queue_position(client, keep["id"]), queue_position(client, drop["id"]))
        assert places == (1, 2)
        calls = pipeline_calls(client)
        client.delete(f"/v1/jobs/{busy['id']}")
        events(client, drop["id"], until="progress")
        assert client.get(f"/v1/jobs/{keep['id']}").json()["status"] == "running"
        assert client.delete(f"/v1/jobs/{drop['id']}").json()["status"] == "cancelled"
        kept = wait_status(client, keep["id"], "succeeded", timeout=180)
        assert kept["status"] == "succeeded"
        # The stopped busy batch, then one batch for both: the cancel did not stop it.
        assert pipeline_calls(client, at_least=calls + 2) == calls + 2
        assert client.get("/v1/stats").json()["requests"] == before + 1


def test_job_errors(server: LiveServer) -> None:
    with server.client() as client:
        bad = client.post("/v1/jobs", json={"prompt": "x", "size": "1000x999"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"
        typo = client.post("/v1/jobs", json={"prompt": "x", "negative": "y"})
        assert typo.status_code == 400 and typo.json()["error"]["param"] == "negative"
        unknown = client.get("/v1/jobs/job_doesnotexist")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "not_found"
        assert client.delete("/v1/jobs/job_doesnotexist").status_code == 404


def test_jobs_survive_a_restart(tmp_path: Path, tiny_models_dir: Path) -> None:
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir))
    first = start_server(settings)
    try:
        with first.client() as client:
            done = client.post("/v1/jobs", json={"prompt": "kept", "seed": 1, "steps": 2}).json()
            assert wait_status(client, done["id"], "succeeded")["status"] == "succeeded"
            busy = client.post("/v1/jobs", json={"prompt": "in flight", "steps": LONG}).json()
            events(client, busy["id"], until="progress")
    finally:
        first.stop()
    with live_server(settings) as second, second.client() as client:
        kept = client.get(f"/v1/jobs/{done['id']}").json()
        assert kept["status"] == "succeeded"
        assert kept["result"]["data"][0]["seed"] == 1
        lost = client.get(f"/v1/jobs/{busy['id']}").json()
        assert lost["status"] == "failed"
        assert lost["error"]["message"] == "interrupted by a server restart"
        assert [kind for kind, _ in events(client, busy["id"])] == ["failed"]
