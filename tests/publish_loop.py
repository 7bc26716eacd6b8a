"""Processes that do nothing but publish cache entries to a shared store (PostgreSQL + S3) as
fast as they can, for tests/e2e/test_cluster_publish.py to SIGKILL at random moments.

    python -m tests.publish_loop STORE_URL S3_ENDPOINT PREFIX

imports the store once, then forks one publisher per `spawn` line on stdin and prints
`publishing PID` once that child has its own connections and is writing; the test kills the
PID. Forked after the imports, a publisher starts in milliseconds (a fresh interpreter would
spend a second importing psycopg and boto3). End of stdin ends it."""

from __future__ import annotations

import contextlib
import os
import sys

from server.cache import ResultCache
from server.store.blobs import S3Blobs
from server.store.sql import open_database
from tests.s3 import BUCKET, CREDENTIALS


def publish(store_url: str, endpoint: str, prefix: str) -> None:
    db = open_database(store_url)
    blobs = S3Blobs(BUCKET, prefix, endpoint_url=endpoint, **CREDENTIALS)
    cache = ResultCache(blobs, db, max_bytes=1 << 40, memory_bytes=0)
    # One write (atomic on a pipe): the publishers share the parent's stdout.
    os.write(1, f"publishing {os.getpid()}\n".encode())
    while True:
        images = [
            (os.urandom(int.from_bytes(os.urandom(2), "big") + 1024), 1, 8, 8, "png")
            for _ in range(1 + os.urandom(1)[0] % 3)
        ]
        cache.put(os.urandom(16).hex(), images, {"model": "tiny-sdxl"})


def main(store_url: str, endpoint: str, prefix: str) -> None:
    # A first client loads botocore's models into process-wide caches that the children
    # inherit: theirs then take a tenth of a second, not a third. It opens no connection.
    S3Blobs(BUCKET, prefix, endpoint_url=endpoint, **CREDENTIALS)
    for line in sys.stdin:
        if line.strip() != "spawn":
            continue
        if os.fork() == 0:
            try:
                publish(store_url, endpoint, prefix)
            finally:
                os._exit(1)  # never the parent's cleanup in a child
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass  # reap the publishers already killed


if __name__ == "__main__":
    main(*sys.argv[1:4])
