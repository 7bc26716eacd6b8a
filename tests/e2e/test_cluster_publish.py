"""50 SIGKILLs of a process while it publishes cache entries to the shared store (PostgreSQL
+ S3): whatever moment the kill lands (an object half sent, objects written and no row yet, a
transaction open), every index row that exists names objects that exist and verify; what a
killed publish left behind is only unreferenced objects, which the sweep removes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from server.cache import ResultCache
from server.store.blobs import S3Blobs
from server.store.sql import Database, open_database
from tests.conftest import REPO
from tests.s3 import BUCKET, CREDENTIALS

KILLS = 50
AT_ONCE = 5
DEADLINE_S = 60.0


@pytest.fixture
def store_url(postgres_url: str) -> str:
    return postgres_url


@contextmanager
def _forker(store_url: str, endpoint: str, prefix: str) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.publish_loop", store_url, endpoint, prefix]
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=DEADLINE_S)


def _spawn(forker: subprocess.Popen[str], count: int) -> list[int]:
    """`count` publishers, each once it is writing."""
    assert forker.stdin is not None and forker.stdout is not None
    forker.stdin.write("spawn\n" * count)
    forker.stdin.flush()
    pids = []
    for _ in range(count):
        word, _, pid = forker.stdout.readline().partition(" ")
        assert word == "publishing", "a publisher did not start"
        pids.append(int(pid))
    return pids


def test_kills_during_publish_never_leave_a_row_without_its_objects(
    store_url: str, s3_endpoint: str
) -> None:
    prefix = f"publish-{os.urandom(4).hex()}"
    kills = 0
    with _forker(store_url, s3_endpoint, prefix) as forker:
        while kills < KILLS:
            pids = _spawn(forker, AT_ONCE)
            # Random moments inside the publish loop: each put is a few S3 writes and one
            # transaction, a few milliseconds, so a kill lands in every part of it.
            time.sleep(random.uniform(0.05, 0.3))
            for pid in pids:
                time.sleep(random.uniform(0, 0.02))
                os.kill(pid, signal.SIGKILL)
                kills += 1
    db: Database = open_database(store_url)
    blobs = S3Blobs(BUCKET, prefix, endpoint_url=s3_endpoint, **CREDENTIALS)
    try:
        cache = ResultCache(blobs, db, max_bytes=1 << 40, memory_bytes=0)
        keys = [row["key"] for row in db.execute("SELECT key FROM cache_entries")]
        assert len(keys) >= KILLS // AT_ONCE  # the publishers got work done between kills
        for key in keys:
            entry = cache.get(key)  # None for a missing or corrupt object
            assert entry is not None, key
        named = {row["sha256"] for row in db.execute("SELECT sha256 FROM cache_images")}
        stored = {name.rsplit("/", 1)[-1].split(".")[0] for name, _ in blobs.list("objects/")}
        assert named <= stored
        # Objects of publishes killed before their row: unreferenced, and swept.
        assert cache.sweep(grace_s=-1) == len(stored - named)
        after = {name.rsplit("/", 1)[-1].split(".")[0] for name, _ in blobs.list("objects/")}
        assert after == named
    finally:
        db.close()
