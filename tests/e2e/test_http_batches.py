"""Batch jobs over HTTP on the tiny pipeline: an inline list, JSONL and CSV uploads (a bad row
fails alone, with its line), the dry run (priced, nothing run or billed), progress events,
cancel through the jobs API, the manifest, its files and the archive, path traversal, API keys,
and batches that outlive a restart (an in-flight one reads as interrupted)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from server.http.job_store import JobStore
from server.store.sql import open_database
from tests.helpers_server import (
    API_KEY,
    LiveServer,
    WatchedRunner,
    fresh_data_dir,
    live_server,
    start_server,
    tiny_settings,
    watched_server,
)

LONG = 200  # steps: seconds of work per row, so a batch is still running when it is stopped
DEADLINE_S = 60  # only stops a hung test


@pytest.fixture(scope="module")
def watched(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[tuple[LiveServer, WatchedRunner]]:
    data = fresh_data_dir(tmp_path_factory.mktemp("batches"), tiny_models_dir)
    with watched_server(tiny_settings(data, api_keys=[API_KEY])) as watched:
        yield watched


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(API_KEY) as client:
        yield client


def requests_for(tag: str, count: int, *, seed: int, steps: int = 2) -> list[dict[str, Any]]:
    return [
        {"prompt": f"{tag} {i}", "seed": seed + i, "steps": steps, "size": "64x64"}
        for i in range(count)
    ]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def events(
    client: httpx.Client, batch_id: str, *, until: str | None = None
) -> list[tuple[str, Any]]:
    """(event, data) pairs from the batch's job event stream, to its end or the first `until`."""
    found: list[tuple[str, Any]] = []
    kind = ""
    with client.stream("GET", f"/v1/jobs/{batch_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                found.append((kind, json.loads(line.removeprefix("data: "))))
                if kind == until:
                    break
    return found


def finished(client: httpx.Client, batch_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        batch: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("succeeded", "failed", "cancelled"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)


def manifest(client: httpx.Client, batch_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/batches/{batch_id}/manifest")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def test_inline_batch_completes_with_a_manifest_of_downloadable_files(
    client: httpx.Client,
) -> None:
    created = client.post("/v1/batches", json={"requests": requests_for("a pier", 6, seed=100)})
    assert created.status_code == 202, created.text
    batch = created.json()
    assert batch["id"].startswith("batch_") and batch["object"] == "batch"
    assert batch["status"] in ("queued", "running") and batch["total"] == 6
    assert batch["invalid_rows"] == []

    final = finished(client, batch["id"])
    assert final["status"] == "succeeded"
    assert (final["done"], final["failed"], final["pending"], final["images"]) == (6, 0, 0, 6)
    assert final["cost_usd"] > 0 and final["cached"] == 0 and final["skipped_budget"] == 0
    job = client.get(f"/v1/jobs/{batch['id']}").json()
    assert job["object"] == "batch" and job["status"] == "succeeded"
    assert job["progress"] == {"step": 6, "total": 6}
    assert job["result"]["done"] == 6

    lines = manifest(client, batch["id"])
    assert [line["row"] for line in lines] == [1, 2, 3, 4, 5, 6]
    for i, line in enumerate(lines):
        assert line["status"] == "done" and line["seeds"] == [100 + i]
        assert len(line["images"]) == len(line["sha256"]) == len(line["urls"]) == 1
        image = client.get(line["urls"][0])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        digest = hashlib.sha256(image.content).hexdigest()
        assert digest == line["sha256"][0]
        # The very image the service generated: the result cache holds it under that digest.
        assert client.get(f"/v1/files/{digest}").content == image.content

    archive = client.get(batch["archive_url"])
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
        names = [line["images"][0] for line in lines]
        assert sorted(zipped.namelist()) == sorted(["manifest.jsonl", *names])
        zipped_lines = [json.loads(x) for x in zipped.read("manifest.jsonl").splitlines()]
        assert [x["sha256"] for x in zipped_lines] == [line["sha256"] for line in lines]
        for line in lines:
            data = zipped.read(line["images"][0])
            assert hashlib.sha256(data).hexdigest() == line["sha256"][0]


def test_progress_events_then_completion(client: httpx.Client) -> None:
    rows = requests_for("a gull", 6, seed=200, steps=4)
    batch = client.post("/v1/batches", json={"requests": rows, "concurrency": 1}).json()
    seen = events(client, batch["id"])
    kinds = [kind for kind, _ in seen]
    assert kinds[-1] == "completed"
    progress = [data for kind, data in seen if kind == "progress"]
    # A late subscriber may miss early rows, never the last one.
    assert progress and progress[-1]["step"] == progress[-1]["total"] == 6
    steps = [p["step"] for p in progress]
    assert steps == sorted(set(steps))
    costs = [p["cost_usd"] for p in progress]
    assert costs == sorted(costs) and costs[-1] > 0
    assert progress[-1]["done"] == 6 and progress[-1]["row"]["status"] == "done"
    assert seen[-1][1]["result"]["done"] == 6


def test_jsonl_upload_with_a_bad_row_that_fails_alone(client: httpx.Client) -> None:
    good = requests_for("a buoy", 3, seed=300)
    text = jsonl(good[:1]) + b"\n" + jsonl([{"prompt": "x", "colour": "red"}]) + jsonl(good[1:])
    created = client.post(
        "/v1/batches",
        files={"file": ("rows.jsonl", text, "application/octet-stream")},
        data={"concurrency": "2"},
    )
    assert created.status_code == 202, created.text
    batch = created.json()
    # Row 2 starts on line 3 of the file (line 2 is blank).
    [invalid] = batch["invalid_rows"]
    assert (invalid["row"], invalid["line"], invalid["param"]) == (2, 3, "colour")
    assert batch["concurrency"] == 2

    final = finished(client, batch["id"])
    assert (final["status"], final["done"], final["failed"]) == ("succeeded", 3, 1)
    lines = {line["row"]: line for line in manifest(client, batch["id"])}
    assert lines[2]["status"] == "failed" and lines[2]["line"] == 3
    assert "unknown field 'colour'" in lines[2]["error"]
    assert [lines[r]["status"] for r in (1, 3, 4)] == ["done"] * 3


def test_row_and_option_errors_name_json_fields_not_cli_flags(client: httpx.Client) -> None:
    """Batch messages are worded by the edge: over HTTP they name the JSON field, never an
    `imagegen batch` flag (--out, --budget-usd)."""
    rows = [{"prompt": "x", "response_format": "url"}, {"prompt": "y", "seed": "7"}]
    created = client.post("/v1/batches", json={"requests": rows, "dry_run": True})
    assert created.status_code == 200, created.text
    problems = created.json()["problems"]
    assert [p["param"] for p in problems] == ["response_format", "seed"]
    assert "drop the field" in problems[0]["message"]
    assert all("--" not in p["message"] for p in problems), problems
    refused = client.post("/v1/batches", json={"requests": rows, "budget_usd": -1})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "budget_usd" and "--" not in error["message"]


def test_csv_upload_applies_form_defaults_and_a_bad_value_fails_alone(
    client: httpx.Client,
) -> None:
    text = b"prompt,seed,steps\na reef,400,2\na wreck,401,many\na cove,402,1\n"
    created = client.post(
        "/v1/batches",
        files={"file": ("rows.csv", text, "text/csv")},
        data={"model": "tiny-sdxl"},
    )
    assert created.status_code == 202, created.text
    batch = created.json()
    assert batch["model"] == "tiny-sdxl"
    assert [(p["row"], p["line"], p["param"]) for p in batch["invalid_rows"]] == [(2, 3, "steps")]
    final = finished(client, batch["id"])
    assert (final["done"], final["failed"]) == (2, 1)
    lines = {line["row"]: line for line in manifest(client, batch["id"])}
    assert lines[1]["model"] == "tiny-sdxl" and lines[1]["params"]["steps"] == 2
    assert lines[2]["status"] == "failed" and lines[2]["param"] == "steps"


def test_dry_run_projects_cost_and_runs_nothing(server: LiveServer, client: httpx.Client) -> None:
    # One measured request, so the local model has a throughput to price rows with.
    assert client.post("/v1/images/generations", json=requests_for("a mast", 1, seed=1)[0])
    before = client.get("/v1/stats").json()
    folders = set((server.state.settings.data_dir / "batches").glob("*"))
    rows = [*requests_for("a sail", 4, seed=500), {"prompt": "x", "size": "big"}]
    planned = client.post("/v1/batches", json={"requests": rows, "dry_run": True})
    assert planned.status_code == 200, planned.text
    plan = planned.json()
    assert plan["object"] == "batch.dry_run"
    assert (plan["total"], plan["valid"], plan["invalid"]) == (5, 4, 1)
    assert plan["problems"][0]["line"] == 5 and plan["problems"][0]["param"] == "size"
    [model] = plan["models"]
    assert (model["provider"], model["model"], model["rows"], model["images"]) == (
        "local",
        "tiny-sdxl",
        4,
        4,
    )
    assert model["usd"] > 0 and model["unpriced_rows"] == 0
    assert plan["cost_by_provider"] == {"local": model["usd"]}
    assert plan["projected_usd"] == model["usd"]
    # Nothing ran, nothing was billed, no batch was made.
    after = client.get("/v1/stats").json()
    assert (after["requests"], after["cost_usd"]) == (before["requests"], before["cost_usd"])
    assert set((server.state.settings.data_dir / "batches").glob("*")) == folders


def test_cancel_stops_starting_rows_and_keeps_the_manifest_whole(
    server: LiveServer, client: httpx.Client, device: WatchedRunner
) -> None:
    rows = requests_for("a storm", 8, seed=600, steps=12)
    first = len(device.batches)
    batch = client.post("/v1/batches", json={"requests": rows, "concurrency": 1}).json()
    seen = events(client, batch["id"], until="progress")
    assert seen[-1][0] == "progress"
    device.hold()  # a row is mid-run when the cancel comes, however fast the host is
    try:
        assert device.holding.wait(DEADLINE_S)
        cancelled = client.delete(f"/v1/jobs/{batch['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    finally:
        device.release()

    final = client.get(f"/v1/batches/{batch['id']}").json()
    assert final["status"] == "cancelled"
    assert 1 <= final["done"] < 8 and final["pending"] > 0
    assert final["done"] + final["failed"] + final["pending"] == 8
    raw = (server.state.settings.data_dir / "batches" / batch["id"] / "manifest.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    assert len([json.loads(line) for line in raw.splitlines()]) == final["done"]
    assert len(manifest(client, batch["id"])) == final["done"]
    late = events(client, batch["id"])
    assert [kind for kind, _ in late] == ["cancelled"]
    assert late[0][1]["result"]["done"] == final["done"]
    # The row in flight was stopped at the step after the cancel, not run to the end.
    quick = client.post("/v1/images/generations", json={"prompt": "next", "steps": 1})
    assert quick.status_code == 200
    *_, stopped, after = device.batches[first:]
    assert stopped.prompts[0].startswith("a storm") and after.prompts == ["next"]
    assert 1 <= stopped.steps < 12


def test_file_route_serves_only_manifest_names(client: httpx.Client) -> None:
    batch = client.post("/v1/batches", json={"requests": requests_for("a key", 1, seed=700)})
    batch_id = batch.json()["id"]
    finished(client, batch_id)
    [line] = manifest(client, batch_id)
    assert client.get(f"/v1/batches/{batch_id}/files/{line['images'][0]}").status_code == 200
    for name in (
        "batch.json",
        "manifest.jsonl",
        "seeds.jsonl",
        "..%2Fimagegen.sqlite3",
        "..%2F..%2Fimagegen.sqlite3",
        "%2E%2E",
        "000001-0.png%00",
    ):
        response = client.get(f"/v1/batches/{batch_id}/files/{name}")
        assert response.status_code == 404, name
        assert response.json()["error"]["code"] == "not_found"
    for path in ("/v1/batches/batch_0000", "/v1/batches/..%2F..%2Fcache/manifest"):
        assert client.get(path).status_code == 404
    image_job = client.post("/v1/jobs", json={"prompt": "not a batch", "steps": 1}).json()
    assert client.get(f"/v1/batches/{image_job['id']}").status_code == 404
    # Cancelling a finished batch changes nothing.
    assert client.post(f"/v1/batches/{batch_id}/cancel").json()["status"] == "succeeded"


def test_bodies_that_cannot_be_read_are_400_naming_the_field(client: httpx.Client) -> None:
    one = requests_for("x", 1, seed=1)
    csv = {"file": ("r.csv", b"prompt\na\n")}
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"json": {"requests": []}}, "requests"),
        ({"json": {"requests": "prompt"}}, "requests"),
        ({"json": {"requests": one, "concurrency": 0}}, "concurrency"),
        ({"json": {"requests": one, "colour": "red"}}, "colour"),
        ({"json": {"prompt": "a single request"}}, "requests"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, None),
        ({"data": {"concurrency": "2"}}, "file"),
        ({"files": {"file": ("rows.json", b'[{"prompt": "a"}]')}}, "file"),
        ({"files": {"file": ("rows.jsonl", b"\n\n")}}, "file"),
        ({"files": {"file": ("rows.csv", b"prompt\n\xff\xfe\n")}}, "file"),
        ({"files": csv, "data": {"budget_usd": "-1"}}, "budget_usd"),
        ({"files": csv, "data": {"colour": "red"}}, "colour"),
    ]
    for kwargs, param in cases:
        response = client.post("/v1/batches", **kwargs)
        assert response.status_code == 400, (kwargs, response.text)
        assert response.json()["error"]["param"] == param, (kwargs, response.text)


def test_unauthenticated_requests_are_refused(server: LiveServer) -> None:
    body = {"requests": requests_for("x", 1, seed=1), "dry_run": True}
    with server.client() as anonymous, server.client("wrong-key") as wrong:
        for client in (anonymous, wrong):
            refused = client.post("/v1/batches", json=body)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_api_key"
            assert client.get("/v1/batches/batch_0000/manifest").status_code == 401
    with server.client(API_KEY) as client:
        assert client.post("/v1/batches", json=body).status_code == 200


def test_a_jobs_table_from_before_batches_gains_the_kind_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as old_db:
        old_db.executescript(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT "
            "NULL, status TEXT NOT NULL, request TEXT NOT NULL, step INTEGER NOT NULL DEFAULT "
            "0, total INTEGER NOT NULL DEFAULT 0, result TEXT, error TEXT);"
            "INSERT INTO jobs (id, created, updated, status, request) "
            "VALUES ('job_old', 1, 1, 'succeeded', '{}');"
        )
    db = open_database(None, path=path)
    try:
        store = JobStore(db)
        old = store.get("job_old")
        assert old is not None and old.object == "image.job"
        assert store.request_of("job_old") == ("image", {})
    finally:
        db.close()
    again = open_database(None, path=path)  # opening it again changes nothing
    try:
        assert JobStore(again).get("job_old") == old
    finally:
        again.close()


def test_batches_survive_a_restart(tmp_path: Path, tiny_models_dir: Path) -> None:
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir))
    first = start_server(settings)
    try:
        with first.client() as client:
            done = client.post("/v1/batches", json={"requests": requests_for("kept", 2, seed=1)})
            done_id = done.json()["id"]
            assert finished(client, done_id)["status"] == "succeeded"
            kept_lines = manifest(client, done_id)
            rows = requests_for("in flight", 3, seed=9, steps=LONG)
            busy = client.post("/v1/batches", json={"requests": rows, "concurrency": 1}).json()
            assert events(client, busy["id"], until="started")[-1][0] == "started"
    finally:
        first.stop()
    with live_server(settings) as second, second.client() as client:
        kept = client.get(f"/v1/batches/{done_id}").json()
        assert (kept["status"], kept["done"]) == ("succeeded", 2)
        lines = manifest(client, done_id)
        assert lines == [
            {**line, "urls": [u.replace(first.url, second.url) for u in line["urls"]]}
            for line in kept_lines
        ]
        image = client.get(lines[0]["urls"][0])
        assert hashlib.sha256(image.content).hexdigest() == lines[0]["sha256"][0]
        lost = client.get(f"/v1/batches/{busy['id']}").json()
        assert lost["status"] == "failed" and lost["pending"] == 3
        assert lost["error"]["message"] == "interrupted by a server restart"
        assert client.get(f"/v1/jobs/{busy['id']}").json()["status"] == "failed"
        assert [kind for kind, _ in events(client, busy["id"])] == ["failed"]


def test_folders_of_purged_batches_are_pruned(server: LiveServer, client: httpx.Client) -> None:
    kept = client.post("/v1/batches", json={"requests": [{"prompt": "keep", "steps": 1}]})
    assert kept.status_code == 202
    orphan = server.state.batches.root / "batch_00000000000000000000"
    orphan.mkdir(parents=True)
    (orphan / "manifest.jsonl").write_text("")
    assert server.state.batches.prune() == 1
    assert not orphan.exists()
    assert (server.state.batches.root / kept.json()["id"]).is_dir()


def test_an_upload_past_the_body_limit_is_413_in_the_envelope(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    """A body past server.max_body_mb is refused before it is read further: no batch, no rows."""
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir), max_body_mb=0.01, models=[])
    with live_server(settings) as live, live.client() as client:
        rows = requests_for("too many", 400, seed=1)
        response = client.post(
            "/v1/batches", files={"file": ("rows.jsonl", jsonl(rows), "application/jsonl")}
        )
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
        assert "server.max_body_mb" in error["message"]
        # Chunked, so no Content-Length to go by: cut off once it passes the limit.
        body = json.dumps({"requests": rows}).encode()
        chunked = client.post(
            "/v1/batches",
            content=(body[i : i + 4096] for i in range(0, len(body), 4096)),
            headers={"Content-Type": "application/json"},
        )
        assert chunked.status_code == 413
        assert chunked.json()["error"]["code"] == "request_too_large"
        assert client.get("/v1/stats").json()["requests"] == 0  # nothing ran
        small = client.post("/v1/batches", json={"requests": requests_for("few", 1, seed=1)})
        assert small.status_code == 202
