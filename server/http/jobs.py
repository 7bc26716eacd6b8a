"""Async generation jobs: the runner that executes them through ImagesServing (their records are
server/http/job_store.py). What the backend reports on the one event channel (`models.base.Events`:
queue position, start, progress) becomes the job's state and its server-sent events.
Other kinds of work (a batch) run through the same records, cancel and events via `launch`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from models.base import Events
from server import errors
from server.http import previews
from server.http.errors import NotFoundError, error_object, internal_error_object
from server.http.job_store import INTERRUPTED, OBJECT_BY_KIND, JobStore
from server.http.protocol import (
    TERMINAL_STATUSES,
    ImageGenerationRequest,
    Job,
    JobProgress,
    JobStatus,
)
from server.http.serving import ImagesServing
from server.http.sse import Event
from server.quotas import IN_PROCESS, Caller

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LiveJob:
    """A job this process is running; events reach subscribers on the event loop."""

    id: str
    created: float
    # The generation request; None for work started with JobRunner.launch.
    body: ImageGenerationRequest | None
    base_url: str
    kind: str = "image"
    # Who submitted it: its quotas and its share of the device queue.
    caller: Caller = field(default_factory=Caller)
    status: JobStatus = "queued"
    position: int | None = None
    step: int = 0
    total: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    subscribers: list[asyncio.Queue[Event]] = field(default_factory=list)
    # Extra members of "progress" events (a batch's counts and running cost).
    detail: dict[str, Any] = field(default_factory=dict)
    # The model being loaded for it, while it waits for that.
    loading: str | None = None

    def snapshot(self) -> Job:
        return Job(
            id=self.id,
            object=OBJECT_BY_KIND.get(self.kind, "image.job"),
            created=int(self.created),
            status=self.status,
            queue_position=self.position if self.status == "queued" else None,
            progress=JobProgress(step=self.step, total=self.total) if self.total else None,
            result=self.result,
            error=self.error,
        )

    def state_events(self) -> list[Event]:
        """What a client that connects now is told first."""
        if self.status == "queued":
            events = [self._event("queued", {"position": self.position})]
            if self.loading is not None:
                events.append(self._event("loading", {"model": self.loading}))
            return events
        if self.status == "running":
            events = [self._event("started", {})]
            if self.total:
                events.append(
                    self._event("progress", {"step": self.step, "total": self.total, **self.detail})
                )
            return events
        return [terminal_event(self.snapshot())]

    def _event(self, kind: str, data: dict[str, Any]) -> Event:
        return Event(kind, {"id": self.id, "status": self.status, **data})


def terminal_event(job: Job) -> Event:
    kind = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}[job.status]
    data: dict[str, Any] = {"id": job.id, "status": job.status}
    if job.status == "succeeded":
        data["result"] = job.result
    elif job.status == "failed":
        data["error"] = job.error
    if job.status != "succeeded" and job.result is not None:
        data["result"] = job.result  # what a batch got done before it stopped
    return Event(kind, data, terminal=True)


class JobEvents(Events):
    """One job's view of the event channel. Hooks arrive from the worker thread (local) or the
    loop (hosted); job state is only ever touched on the loop, so each is handed over."""

    def __init__(self, runner: JobRunner, job: LiveJob, loop: asyncio.AbstractEventLoop):
        self.runner = runner
        self.job = job
        self.loop = loop

    def queued(self, position: int) -> None:
        self._call(self.runner._on_queued, self.job, position)

    def loading(self, model: str) -> None:
        self._call(self.runner._on_loading, self.job, model)

    def started(self) -> None:
        self._call(self.runner._on_started, self.job)

    def wants_preview(self, step: int, total: int) -> bool:
        # A plain read of the loop's list from the worker's thread: a subscriber that comes
        # mid-step gets the next preview.
        return bool(self.job.subscribers) and previews.every(step, self.runner.preview_every)

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        # Encoded here (the worker's thread), not on the loop; the first image's only.
        shown = previews.encoded(preview[0]) if preview else None
        self._call(self.runner._on_progress, self.job, step, total, shown)

    def _call(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server has stopped
            self.loop.call_soon_threadsafe(fn, *args)


# Work run as a job (JobRunner.launch): given its LiveJob, returns the job's result.
Work = Callable[[LiveJob], Awaitable[dict[str, Any]]]


class JobRunner:
    def __init__(self, store: JobStore, serving: ImagesServing) -> None:
        self.store = store
        self.serving = serving
        self.live: dict[str, LiveJob] = {}
        self._closing = False
        self.preview_every = serving.settings.server.preview_every_steps

    def start(self) -> None:
        self.store.purge()
        recovered = self.store.recover()
        if recovered:
            log.warning("%d job(s) from a previous run marked failed: %s", recovered, INTERRUPTED)

    async def aclose(self) -> None:
        """Let running jobs finish within the drain's grace (SIGTERM: `Readiness.drain`), then
        stop the rest without touching their records: the next start marks them interrupted,
        exactly as after a crash."""
        deadline = self.serving.readiness.drain_deadline
        pending = {job.task for job in self.live.values() if job.task is not None}
        if pending and deadline is not None and deadline > time.monotonic():
            log.info(
                "waiting up to %.0f s for %d job(s) to finish",
                deadline - time.monotonic(),
                len(pending),
            )
            await asyncio.wait(pending, timeout=deadline - time.monotonic())
        self._closing = True
        tasks = [job.task for job in self.live.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            log.warning("%d job(s) stopped unfinished by the shutdown: %s", len(tasks), INTERRUPTED)
            await asyncio.wait(tasks, timeout=10.0)

    # -- the API -------------------------------------------------------------------------

    async def submit(
        self, body: ImageGenerationRequest, base_url: str, caller: Caller = IN_PROCESS
    ) -> Job:
        """Check the request exactly as a generation would be checked (bad fields, unknown
        model, blocked prompt, a spent budget or a full queue are HTTP errors, with no job
        record), then answer at once: the job reports queued -> running -> its end."""
        if body.stream:
            raise errors.InvalidRequestError(
                "stream is for POST /v1/images/generations and /v1/images/edits; a job "
                "reports its progress and previews on GET /v1/jobs/{id}/events: drop stream",
                param="stream",
            )
        await self.serving.admit(body, caller)
        job = LiveJob(
            id="job_" + uuid.uuid4().hex[:24],
            created=time.time(),
            body=body,
            base_url=base_url,
            caller=caller,
        )
        self.store.insert(job.id, job.created, body)
        self.live[job.id] = job
        job.task = asyncio.create_task(self._run(job), name=f"imagegen-{job.id}")
        return job.snapshot()

    def launch(self, job_id: str, *, kind: str, request: dict[str, Any], work: Work) -> Job:
        """Run `work` as a job of `kind`, with the same record, cancel and events as a
        generation job. `work` reports with `report` and returns the result; if it is cancelled
        or fails, the job keeps whatever `job.result` holds by then."""
        job = LiveJob(id=job_id, created=time.time(), body=None, base_url="", kind=kind)
        self.store.insert_record(job.id, job.created, json.dumps(request), kind=kind)
        self.live[job.id] = job
        job.task = asyncio.create_task(self._run_work(job, work), name=f"imagegen-{job.id}")
        return job.snapshot()

    def report(self, job: LiveJob, step: int, total: int, detail: dict[str, Any]) -> None:
        """Progress of launched work (call it on the event loop)."""
        if job.status in TERMINAL_STATUSES:
            return
        job.step, job.total, job.detail = step, total, detail
        self._publish(job, "progress", {"step": step, "total": total, **detail})

    def get(self, job_id: str) -> Job:
        job = self.live.get(job_id)
        if job is not None:
            return job.snapshot()
        stored = self.store.get(job_id)
        if stored is None:
            raise NotFoundError(f"no job with id '{job_id}'", param="id")
        return stored

    async def cancel(self, job_id: str) -> Job:
        job = self.live.get(job_id)
        if job is not None and job.task is not None and job.status not in TERMINAL_STATUSES:
            job.task.cancel()
            await asyncio.wait({job.task}, timeout=10.0)
            return job.snapshot()
        return self.get(job_id)

    def subscribe(self, job_id: str) -> tuple[list[Event], asyncio.Queue[Event] | None]:
        """The job's current state as events, and a queue of what happens next (None once
        the job is over)."""
        job = self.live.get(job_id)
        if job is None:
            return [terminal_or_state(self.get(job_id))], None
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job.subscribers.append(queue)
        return job.state_events(), queue

    def interrupted_event(self, job_id: str) -> Event | None:
        """The end a stream reports for a job the shutdown gives up on: what its record will
        say after the restart (None if the job is over: its own end was sent)."""
        job = self.live.get(job_id)
        if job is None or job.status in TERMINAL_STATUSES:
            return None
        error = {"message": INTERRUPTED, "type": "server_error", "param": None}
        return Event(
            "failed",
            {"id": job.id, "status": "failed", "error": {**error, "code": "interrupted"}},
            terminal=True,
        )

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[Event] | None) -> None:
        job = self.live.get(job_id)
        if job is not None and queue is not None and queue in job.subscribers:
            job.subscribers.remove(queue)

    # -- running -------------------------------------------------------------------------

    async def _run(self, job: LiveJob) -> None:
        body = job.body
        assert body is not None
        events = JobEvents(self, job, asyncio.get_running_loop())
        try:
            # A job's deadline is its own `timeout` only: it runs on after its POST returned.
            result = await self.serving.generate(
                body, endpoint="jobs", events=events, timeout_s=body.timeout, caller=job.caller
            )
        except asyncio.CancelledError:
            if not self._closing:
                self._finish(job, "cancelled")
            raise
        except errors.ImagegenError as exc:
            if not self._closing:
                self._finish(job, "failed", error=error_object(exc))
        except Exception:
            log.exception("job %s failed", job.id)
            self._finish(
                job,
                "failed",
                error=internal_error_object(f"job {job.id}"),
            )
        else:
            rendered = await self.serving.render(result, body, job.base_url)
            self._finish(job, "succeeded", result=rendered)

    async def _run_work(self, job: LiveJob, work: Work) -> None:
        self._on_started(job)
        try:
            result = await work(job)
        except asyncio.CancelledError:
            if not self._closing:
                self._finish(job, "cancelled", result=job.result)
            raise
        except errors.ImagegenError as exc:
            if not self._closing:
                self._finish(job, "failed", result=job.result, error=error_object(exc))
        except Exception:
            log.exception("job %s failed", job.id)
            self._finish(
                job,
                "failed",
                result=job.result,
                error=internal_error_object(f"job {job.id}"),
            )
        else:
            self._finish(job, "succeeded", result=result)

    def _on_queued(self, job: LiveJob, position: int) -> None:
        if job.status in TERMINAL_STATUSES:
            return
        job.position = position
        if job.status != "queued":
            job.status = "queued"  # the quality check's retry queues it once more
            self.store.update(job.id, "queued")
        self._publish(job, "queued", {"position": position})

    def _on_loading(self, job: LiveJob, model: str) -> None:
        if job.status in TERMINAL_STATUSES:
            return
        job.loading = model
        self._publish(job, "loading", {"model": model})

    def _on_started(self, job: LiveJob) -> None:
        if job.status in TERMINAL_STATUSES:
            return
        job.status, job.position, job.loading = "running", None, None
        self.store.update(job.id, "running")
        self._publish(job, "started", {})

    def _on_progress(self, job: LiveJob, step: int, total: int, preview: str | None) -> None:
        if job.status in TERMINAL_STATUSES:
            return
        job.step, job.total = step, total
        data: dict[str, Any] = {"step": step, "total": total}
        if preview is not None:
            data["preview"] = preview  # base64 PNG of the first image's denoising state
        self._publish(job, "progress", data)

    def _finish(
        self,
        job: LiveJob,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        job.status, job.result, job.error, job.position = status, result, error, None
        self.store.update(
            job.id, status, result=result, error=error, progress=(job.step, job.total)
        )
        event = terminal_event(job.snapshot())
        for queue in job.subscribers:
            queue.put_nowait(event)
        job.subscribers.clear()
        self.live.pop(job.id, None)

    def _publish(self, job: LiveJob, kind: str, data: dict[str, Any]) -> None:
        event = Event(kind, {"id": job.id, "status": job.status, **data})
        for queue in job.subscribers:
            queue.put_nowait(event)


def terminal_or_state(job: Job) -> Event:
    if job.status in TERMINAL_STATUSES:
        return terminal_event(job)
    return Event(job.status, {"id": job.id, "status": job.status})
