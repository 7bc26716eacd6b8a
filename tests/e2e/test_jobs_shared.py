"""Jobs across processes: real `imagegen serve` processes sharing one real PostgreSQL. A job made
on one is read, streamed and cancelled through another, and a job whose process was killed
reads as interrupted there (its owner was on this host and its pid is gone) without waiting
for the owner's lease to run out. The reaper marks only the jobs of owners that are gone (a
dead pid here, a lapsed lease anywhere), never a live replica's."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from server.http.job_store import JobStore
from server.store.sql import open_database
from tests.cluster import Replica, replicas
from tests.e2e.test_sigterm import SLOW, is_png, read_events

DEADLINE_S = 180  # only stops a hung test (three serve processes may share two cores)
# Long enough that the follower on the other process sees it run, and no longer.
STREAMED = {"size": "64x64", "steps": 30}


@pytest.fixture(scope="module")
def store_url(module_postgres_url: str) -> str:
    return module_postgres_url


@pytest.fixture(scope="module")
def trio(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, store_url: str
) -> Iterator[list[Replica]]:
    """Three serve processes on the store (started together): A and B, and C to be killed."""
    root = tmp_path_factory.mktemp("shared")
    with replicas(3, root, tiny_models_dir, {"IMAGEGEN_STORE__URL": store_url}) as running:
        yield running


def tail(replica: Replica) -> str:
    return "".join(replica.log[-20:])


def follow(client: httpx.Client, job_id: str) -> tuple[threading.Thread, list[tuple[str, Any]]]:
    """The job's event stream read in a thread, into the list returned with it."""
    events: list[tuple[str, Any]] = []
    reader = threading.Thread(target=read_events, args=(client, job_id, events), daemon=True)
    reader.start()
    return reader, events


def wait_for(what: str, check: Any, *context: Any) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, (f"no {what}", *context)
        time.sleep(0.05)


def test_a_job_is_read_and_streamed_through_another_process(trio: list[Replica]) -> None:
    a, b, _ = trio
    with a.client() as on_a, b.client() as on_b:
        created = on_a.post("/v1/jobs", json={"prompt": "a lighthouse", "seed": 3, **STREAMED})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        assert on_b.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running")
        reader, events = follow(on_b, job_id)
        reader.join(DEADLINE_S)
        assert not reader.is_alive(), (events[-3:], tail(b))

        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "completed", (events[-3:], tail(a), tail(b))
        assert "started" in kinds, kinds
        steps = [data["step"] for kind, data in events if kind == "progress"]
        assert steps and steps == sorted(steps), kinds
        assert all(data["id"] == job_id for _, data in events)
        result = events[-1][1]["result"]
        assert is_png(result["data"][0]["b64_json"]) and result["data"][0]["seed"] == 3

        # Both processes now read the same record.
        for client in (on_a, on_b):
            final = client.get(f"/v1/jobs/{job_id}").json()
            assert final["status"] == "succeeded"
            assert final["result"] == result
            assert final["progress"] == {"step": 30, "total": 30}


def test_a_job_is_cancelled_through_another_process(trio: list[Replica]) -> None:
    a, b, _ = trio
    with a.client() as on_a, b.client() as on_b:
        job_id = on_a.post("/v1/jobs", json={"prompt": "a slow harbour", **SLOW}).json()["id"]
        reader, events = follow(on_b, job_id)
        wait_for("progress on B", lambda: any(k == "progress" for k, _ in events), events)

        cancelled = on_b.delete(f"/v1/jobs/{job_id}")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled", (tail(a), tail(b))
        reader.join(DEADLINE_S)
        assert events[-1][0] == "cancelled", events[-3:]

        assert on_a.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        for client in (on_a, on_b):
            late: list[tuple[str, Any]] = []
            read_events(client, job_id, late)
            assert [kind for kind, _ in late] == ["cancelled"]
        # The owner is free again: its next job runs to the end.
        quick = on_a.post("/v1/images/generations", json={"prompt": "next", "steps": 2})
        assert quick.status_code == 200, quick.text


def test_a_killed_owners_job_reads_as_interrupted_elsewhere(
    trio: list[Replica], store_url: str
) -> None:
    _, b, owner = trio
    with owner.client() as on_owner, b.client() as on_b:
        job_id = on_owner.post("/v1/jobs", json={"prompt": "an orphan", **SLOW}).json()["id"]
        reader, events = follow(on_b, job_id)
        wait_for("progress on B", lambda: any(k == "progress" for k, _ in events), events)
        owner.kill()  # and reaped: until then its pid would still exist (a zombie)

        # B's stream follows the record to its end.
        reader.join(DEADLINE_S)
        assert not reader.is_alive()
        kind, last = events[-1]
        assert kind == "failed", events[-3:]
        assert last["error"]["code"] == "interrupted"
        lost = on_b.get(f"/v1/jobs/{job_id}").json()
        assert lost["status"] == "failed" and lost["error"]["code"] == "interrupted"
    # Marked while the owner's lease still held: the dead pid told, not the lease running out.
    with psycopg.connect(store_url) as conn:
        row = conn.execute("SELECT updated, lease FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None and row[0] < row[1]


def test_the_reaper_marks_only_jobs_whose_owner_is_gone(postgres_url: str, tmp_path: Path) -> None:
    db = open_database(postgres_url, path=tmp_path / "unused.sqlite3")
    try:
        store = JobStore(db)
        here = socket.gethostname()
        exited = subprocess.Popen(["true"])
        exited.wait()  # its pid exists no more
        owners = {
            "mine": f"{here}:{os.getpid()}:self0000",
            "live replica": f"{here}:{os.getppid()}:other000",
            "dead here": f"{here}:{exited.pid}:dead0000",
            "other host": "another-host.invalid:1:far00000",
        }
        for name, owner in owners.items():
            store.insert_record(f"job_{name}", time.time(), "{}", owner=owner)
        store.insert_record("job_lapsed", time.time(), "{}", owner=owners["other host"])
        with db.transaction() as tx:  # a replica elsewhere that stopped renewing its lease
            tx.execute("UPDATE jobs SET lease = 0 WHERE id = 'job_lapsed'")

        reaped = store.reap(spare=owners["mine"])

        assert sorted(reaped) == ["job_dead here", "job_lapsed"]
        for job_id in reaped:
            stored = store.get(job_id)
            assert stored is not None and stored.error is not None
            assert (stored.status, stored.error["code"]) == ("failed", "interrupted")
        for name in ("mine", "live replica", "other host"):
            found = store.get(f"job_{name}")
            assert found is not None and found.status == "queued"
    finally:
        db.close()
