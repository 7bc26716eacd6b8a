"""Job records in the store's database: finished jobs outlive a restart, and every process
sharing the store reads, follows and cancels any job through them. Each in-flight record names
its owner (the process running it) and a lease the owner renews; one whose owner is gone (the
lease ran out, or a process on this host that no longer exists) reads as interrupted, never
stuck. Image jobs and batches share the table (`kind`)."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

from server.http.protocol import ImageGenerationRequest, Job, JobProgress, JobStatus
from server.store.sql import Database, Row, Tx

INTERRUPTED = "interrupted by a server restart"
# Finished jobs (their results hold the images) are dropped at start-up after this long.
RETENTION_S = 7 * 24 * 3600
# How long an owner's claim on its in-flight jobs holds unless renewed (it renews every third
# of it): long enough to survive a busy event loop and a slow database round trip, short
# enough that the jobs of a replica that vanished with its host read as interrupted soon.
LEASE_S = 30.0
# Told of every change to a record (the payload is the job id), and of a cancel asked for.
CHANNEL = "imagegen_jobs"
# The statuses of a job someone is still working on.
_LIVE = "('queued', 'running')"

# What a job is (the `kind` column): "image" (POST /v1/jobs) or "batch" (POST /v1/batches).
OBJECT_BY_KIND: dict[str, Literal["image.job", "batch"]] = {"image": "image.job", "batch": "batch"}

_INTERRUPTED_ERROR = json.dumps(
    {"message": INTERRUPTED, "type": "server_error", "param": None, "code": "interrupted"}
)
_COLUMNS = "id, created, status, step, total, result, error, kind, owner, lease"


@dataclass(frozen=True)
class Stored:
    """A job's record and who holds it."""

    job: Job
    owner: str | None
    lease: float

    def orphaned(self, now: float) -> bool:
        """Whether an in-flight job's owner will never finish it: its lease ran out, or it is
        a process on this host that no longer exists (a restart of a single-box server marks
        its predecessor's jobs at once instead of a lease later)."""
        return self.lease < now or not owner_alive(self.owner)


def owner_alive(owner: str | None) -> bool:
    """False only for an owner ("host:pid:random", server.store.claims.process_owner) on this
    host whose process is gone; another host's owners are judged by their lease alone."""
    host, _, rest = (owner or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists (another user's process): not ours to judge
    return True


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def reap(self, *, spare: str) -> list[str]:
        """Mark failed (interrupted) every in-flight job whose owner is gone, except those of
        `spare` (the caller's own); their ids."""
        now = time.time()
        with self.db.transaction() as tx:
            rows = tx.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status IN {_LIVE} "
                "AND (owner IS NULL OR owner <> ?)",
                (spare,),
            ).rows
            gone = [s for s in map(_stored, rows) if s.orphaned(now)]
            return [s.job.id for s in gone if _interrupt(tx, s, now)]

    def interrupt(self, stored: Stored) -> bool:
        """Mark one orphaned job failed (interrupted), unless its record changed since it was
        read (its owner renewed the lease or ended it); whether it was marked."""
        with self.db.transaction() as tx:
            return _interrupt(tx, stored, time.time())

    def purge(self, older_than_s: float = RETENTION_S) -> int:
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
                "AND updated < ?",
                (time.time() - older_than_s,),
            )
            return int(cursor.rowcount)

    def insert(
        self, job_id: str, created: float, body: ImageGenerationRequest, *, owner: str
    ) -> None:
        self.insert_record(job_id, created, body.model_dump_json(exclude_none=True), owner=owner)

    def insert_record(
        self, job_id: str, created: float, request: str, *, owner: str, kind: str = "image"
    ) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (id, created, updated, status, request, kind, owner, lease) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, created, created, request, kind, owner, time.time() + LEASE_S),
            )

    def renew(self, owner: str) -> None:
        """Extend the lease of all of `owner`'s in-flight jobs."""
        with self.db.transaction() as tx:
            tx.execute(
                f"UPDATE jobs SET lease = ? WHERE owner = ? AND status IN {_LIVE}",
                (time.time() + LEASE_S, owner),
            )

    def release(self, owner: str) -> None:
        """Give up `owner`'s in-flight jobs (a shutdown that stops them unfinished): their
        lease ends now, so the next reaper, here or in any process, marks them interrupted."""
        with self.db.transaction() as tx:
            tx.execute(f"UPDATE jobs SET lease = 0 WHERE owner = ? AND status IN {_LIVE}", (owner,))

    def request_cancel(self, job_id: str) -> bool:
        """Ask the job's owner, wherever it runs, to cancel it; False if it is over."""
        with self.db.transaction() as tx:
            changed = tx.execute(
                f"UPDATE jobs SET cancel = 1 WHERE id = ? AND status IN {_LIVE}", (job_id,)
            ).rowcount
            if changed:
                tx.notify(CHANNEL, job_id)
        return bool(changed)

    def stopped(self, job_ids: list[str]) -> list[str]:
        """Which of these jobs (running here) must stop: a cancel was asked for through another
        process, or another process already ended the record (this one's lease ran out)."""
        if not job_ids:
            return []
        marks = ", ".join("?" * len(job_ids))
        rows = self.db.execute(
            f"SELECT id FROM jobs WHERE id IN ({marks}) AND (cancel = 1 OR status NOT IN {_LIVE})",
            job_ids,
        )
        return [str(r["id"]) for r in rows]

    def request_of(self, job_id: str) -> tuple[str, dict[str, Any]] | None:
        """The job's kind and the request it was created with, or None if there is no such
        job."""
        rows = self.db.execute("SELECT kind, request FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        request = json.loads(rows[0]["request"])
        return str(rows[0]["kind"]), request if isinstance(request, dict) else {}

    def update(
        self,
        job_id: str,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        progress: tuple[int, int] = (0, 0),
    ) -> bool:
        """The owner's write of a new status; False if the record was already over (another
        process marked it interrupted), which it then stays."""
        with self.db.transaction() as tx:
            changed = tx.execute(
                "UPDATE jobs SET status = ?, updated = ?, step = ?, total = ?, result = ?, "
                f"error = ? WHERE id = ? AND status IN {_LIVE}",
                (
                    status,
                    time.time(),
                    progress[0],
                    progress[1],
                    json.dumps(result) if result is not None else None,
                    json.dumps(error) if error is not None else None,
                    job_id,
                ),
            ).rowcount
            if changed:
                tx.notify(CHANNEL, job_id)
        return bool(changed)

    def progress(self, job_id: str, step: int, total: int) -> None:
        """The owner's write of the step reached, for readers in other processes."""
        with self.db.transaction() as tx:
            changed = tx.execute(
                f"UPDATE jobs SET step = ?, total = ?, updated = ? WHERE id = ? "
                f"AND status IN {_LIVE}",
                (step, total, time.time(), job_id),
            ).rowcount
            if changed:
                tx.notify(CHANNEL, job_id)

    def delete(self, job_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def record(self, job_id: str) -> Stored | None:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _stored(rows[0]) if rows else None

    def get(self, job_id: str) -> Job | None:
        stored = self.record(job_id)
        return stored.job if stored is not None else None


def _stored(row: Row) -> Stored:
    job = Job(
        id=row["id"],
        object=OBJECT_BY_KIND.get(row["kind"], "image.job"),
        created=int(row["created"]),
        status=row["status"],
        progress=JobProgress(step=row["step"], total=row["total"]) if row["total"] else None,
        result=json.loads(row["result"]) if row["result"] else None,
        error=json.loads(row["error"]) if row["error"] else None,
    )
    return Stored(job=job, owner=row["owner"], lease=float(row["lease"]))


def _interrupt(tx: Tx, stored: Stored, now: float) -> bool:
    # Only the record as it was judged: an owner that renewed its lease meanwhile is alive.
    changed = tx.execute(
        "UPDATE jobs SET status = 'failed', error = ?, updated = ? "
        f"WHERE id = ? AND status IN {_LIVE} AND COALESCE(owner, '') = ? AND lease <= ?",
        (_INTERRUPTED_ERROR, now, stored.job.id, stored.owner or "", stored.lease),
    ).rowcount
    if changed:
        tx.notify(CHANNEL, stored.job.id)
    return bool(changed)
