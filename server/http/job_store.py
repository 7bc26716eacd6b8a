"""Job records in the store's database: finished jobs outlive a restart, and in-flight
ones a previous process left behind read as interrupted, never stuck. Image jobs and batches
share the table (`kind`)."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from server.http.protocol import ImageGenerationRequest, Job, JobProgress, JobStatus
from server.store.sql import Database

INTERRUPTED = "interrupted by a server restart"
# Finished jobs (their results hold the images) are dropped at start-up after this long.
RETENTION_S = 7 * 24 * 3600

# What a job is (the `kind` column): "image" (POST /v1/jobs) or "batch" (POST /v1/batches).
OBJECT_BY_KIND: dict[str, Literal["image.job", "batch"]] = {"image": "image.job", "batch": "batch"}


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def recover(self) -> int:
        """Jobs a previous process left queued or running will never finish: mark them."""
        error = {
            "message": INTERRUPTED,
            "type": "server_error",
            "param": None,
            "code": "interrupted",
        }
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = 'failed', error = ?, updated = ? "
                "WHERE status IN ('queued', 'running')",
                (json.dumps(error), time.time()),
            )
            return int(cursor.rowcount)

    def purge(self, older_than_s: float = RETENTION_S) -> int:
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
                "AND updated < ?",
                (time.time() - older_than_s,),
            )
            return int(cursor.rowcount)

    def insert(self, job_id: str, created: float, body: ImageGenerationRequest) -> None:
        self.insert_record(job_id, created, body.model_dump_json(exclude_none=True))

    def insert_record(
        self, job_id: str, created: float, request: str, *, kind: str = "image"
    ) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO jobs (id, created, updated, status, request, kind) "
                "VALUES (?, ?, ?, 'queued', ?, ?)",
                (job_id, created, created, request, kind),
            )

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
    ) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, updated = ?, step = ?, total = ?, result = ?, "
                "error = ? WHERE id = ?",
                (
                    status,
                    time.time(),
                    progress[0],
                    progress[1],
                    json.dumps(result) if result is not None else None,
                    json.dumps(error) if error is not None else None,
                    job_id,
                ),
            )

    def delete(self, job_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def get(self, job_id: str) -> Job | None:
        rows = self.db.execute(
            "SELECT id, created, status, step, total, result, error, kind FROM jobs WHERE id = ?",
            (job_id,),
        )
        if not rows:
            return None
        row = rows[0]
        return Job(
            id=row["id"],
            object=OBJECT_BY_KIND.get(row["kind"], "image.job"),
            created=int(row["created"]),
            status=row["status"],
            progress=JobProgress(step=row["step"], total=row["total"]) if row["total"] else None,
            result=json.loads(row["result"]) if row["result"] else None,
            error=json.loads(row["error"]) if row["error"] else None,
        )
