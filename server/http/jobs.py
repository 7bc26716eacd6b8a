"""Async generation jobs: the runner that executes them through ImagesServing (their records are
server/http/job_store.py). What the backend reports on the one event channel (`models.base.Events`:
queue position, start, progress) becomes the job's state and its server-sent events.
Other kinds of work (a batch) run through the same records, cancel and events via `launch`.

Every process sharing the store serves every job: one running elsewhere is read from its
record, followed by polling it (woken early by the store's notifications), and cancelled by a
flag its owner's watcher picks up; the watcher also renews the owner's lease and runs the
reaper that marks the jobs of a vanished owner interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from models.base import Events
from server import errors
from server.http import previews
from server.http.errors import NotFoundError, error_object, internal_error_object
from server.http.job_store import CHANNEL, INTERRUPTED, LEASE_S, OBJECT_BY_KIND, JobStore
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
from server.store.claims import process_owner

log = logging.getLogger(__name__)

# How often the owner checks its jobs' records for a cancel asked for through another process
# (one query for all of them, and only while it runs any).
WATCH_S = 0.25
# How often a process reaps orphaned jobs (one process at a time: the "job-reaper" lock). A
# reader of a job is not kept waiting for it: reading an in-flight record judges its owner too.
REAP_S = 30.0
REAPER_LOCK = "job-reaper"
# A record followed for a client of another process's job is re-read this often, sooner when
# a notification says it changed (PostgreSQL; SQLite's processes share a host and poll).
FOLLOW_S = 0.25
# A cancel through another process waits this long for the owner to stop the job.
CANCEL_WAIT_S = 10.0
CANCEL_POLL_S = 0.1
# The step reached is written to the record at most this often per job (readers elsewhere poll
# at about that pace); status changes are written at once.
PROGRESS_WRITE_S = 0.25


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
    # When its step was last written to the record (time.monotonic()).
    written: float = 0.0

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
        # This process's name on the records of the jobs it runs.
        self.owner = process_owner()
        self.live: dict[str, LiveJob] = {}
        self._closing = False
        self.preview_every = serving.settings.server.preview_every_steps
        self._watcher: asyncio.Task[None] | None = None
        # Another process's jobs followed for a stream here: each queue's polling task.
        self._following: dict[asyncio.Queue[Event], asyncio.Task[None]] = {}
        # Who waits on a record here (a follower, a cancel), to wake on its notification.
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._unlisten: Callable[[], None] = lambda: None

    def start(self) -> None:
        """Purge old records, reap orphaned ones, and start the watcher (call on the loop)."""
        self.store.purge()
        self._reap()
        loop = asyncio.get_running_loop()

        def heard(job_id: str) -> None:  # on the store's listener thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server has stopped
                loop.call_soon_threadsafe(self._wake, job_id)

        self._unlisten = self.store.db.subscribe(CHANNEL, heard)
        self._watcher = asyncio.create_task(self._watch(), name="imagegen-jobs-watch")

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
        helpers = [t for t in (self._watcher, *self._following.values()) if t is not None]
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        self._unlisten()
        if tasks:
            # Their lease ends now: the next reaper, here or in a replica, marks them.
            self.store.release(self.owner)

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
        self.store.insert(job.id, job.created, body, owner=self.owner)
        self.live[job.id] = job
        job.task = asyncio.create_task(self._run(job), name=f"imagegen-{job.id}")
        return job.snapshot()

    def launch(self, job_id: str, *, kind: str, request: dict[str, Any], work: Work) -> Job:
        """Run `work` as a job of `kind`, with the same record, cancel and events as a
        generation job. `work` reports with `report` and returns the result; if it is cancelled
        or fails, the job keeps whatever `job.result` holds by then."""
        job = LiveJob(id=job_id, created=time.time(), body=None, base_url="", kind=kind)
        self.store.insert_record(
            job.id, job.created, json.dumps(request), owner=self.owner, kind=kind
        )
        self.live[job.id] = job
        job.task = asyncio.create_task(self._run_work(job, work), name=f"imagegen-{job.id}")
        return job.snapshot()

    def report(self, job: LiveJob, step: int, total: int, detail: dict[str, Any]) -> None:
        """Progress of launched work (call it on the event loop)."""
        if job.status in TERMINAL_STATUSES:
            return
        job.step, job.total, job.detail = step, total, detail
        self._write_progress(job)
        self._publish(job, "progress", {"step": step, "total": total, **detail})

    def get(self, job_id: str) -> Job:
        job = self.live.get(job_id)
        if job is not None:
            return job.snapshot()
        return self._shared_or_404(job_id)

    async def cancel(self, job_id: str) -> Job:
        job = self.live.get(job_id)
        if job is not None and job.task is not None and job.status not in TERMINAL_STATUSES:
            job.task.cancel()
            await asyncio.wait({job.task}, timeout=10.0)
            return job.snapshot()
        if job is not None:
            return job.snapshot()
        return await self._cancel_elsewhere(job_id)

    def subscribe(self, job_id: str) -> tuple[list[Event], asyncio.Queue[Event] | None]:
        """The job's current state as events, and a queue of what happens next (None once
        the job is over)."""
        job = self.live.get(job_id)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        if job is None:
            stored = self._shared_or_404(job_id)
            if stored.status in TERMINAL_STATUSES:
                return [terminal_event(stored)], None
            follower = self._follow(stored, queue)
            self._following[queue] = asyncio.create_task(follower, name=f"imagegen-follow-{job_id}")
            return record_events(stored), queue
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
        if queue is not None and (follower := self._following.pop(queue, None)) is not None:
            follower.cancel()
        job = self.live.get(job_id)
        if job is not None and queue is not None and queue in job.subscribers:
            job.subscribers.remove(queue)

    # -- jobs of other processes ---------------------------------------------------------

    def _shared(self, job_id: str) -> Job | None:
        """The job's record; an in-flight one whose owner is gone is marked interrupted first,
        so that no reader waits on a job no one will finish."""
        stored = self.store.record(job_id)
        if stored is None:
            return None
        in_flight = stored.job.status not in TERMINAL_STATUSES
        if in_flight and stored.owner != self.owner and stored.orphaned(time.time()):
            if self.store.interrupt(stored):
                log.warning("job %s: its process is gone, marked failed: %s", job_id, INTERRUPTED)
            stored = self.store.record(job_id)
        return stored.job if stored is not None else None

    def _shared_or_404(self, job_id: str) -> Job:
        stored = self._shared(job_id)
        if stored is None:
            raise NotFoundError(f"no job with id '{job_id}'", param="id")
        return stored

    async def _cancel_elsewhere(self, job_id: str) -> Job:
        """Flag the job for its owner to cancel, and wait a while for the record to end."""
        with self._woken_on(job_id) as woken:
            current = await asyncio.to_thread(self._shared_or_404, job_id)
            if current.status in TERMINAL_STATUSES:
                return current
            await asyncio.to_thread(self.store.request_cancel, job_id)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while current.status not in TERMINAL_STATUSES and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), CANCEL_POLL_S)
                woken.clear()
                current = await asyncio.to_thread(self._shared_or_404, job_id)
            return current

    async def _follow(self, last: Job, queue: asyncio.Queue[Event]) -> None:
        """Feed `queue` with what changes in another process's job, to its end."""
        with self._woken_on(last.id) as woken:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), FOLLOW_S)
                woken.clear()
                try:
                    current = await asyncio.to_thread(self._shared, last.id)
                except Exception as exc:  # the store is unreachable for now: poll on
                    log.warning("job %s: cannot read its record (%s)", last.id, exc)
                    continue
                if current is None:
                    return  # deleted: there is nothing more to tell
                for event in record_changes(last, current):
                    queue.put_nowait(event)
                if current.status in TERMINAL_STATUSES:
                    return
                last = current

    @contextlib.contextmanager
    def _woken_on(self, job_id: str) -> Iterator[asyncio.Event]:
        woken = asyncio.Event()
        self._waiting.setdefault(job_id, set()).add(woken)
        try:
            yield woken
        finally:
            waiting = self._waiting.get(job_id, set())
            waiting.discard(woken)
            if not waiting:
                self._waiting.pop(job_id, None)

    def _wake(self, job_id: str) -> None:
        for woken in self._waiting.get(job_id, ()):
            woken.set()

    # -- the watcher: cancels asked for elsewhere, the lease, the reaper ------------------

    async def _watch(self) -> None:
        renewed = reaped = time.monotonic()
        failing = False
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                now = time.monotonic()
                if self.live:
                    for job_id in await asyncio.to_thread(self.store.stopped, list(self.live)):
                        self._stop(job_id)
                    if now - renewed >= LEASE_S / 3:
                        await asyncio.to_thread(self.store.renew, self.owner)
                        renewed = now
                else:
                    renewed = now  # a job inserted from now on starts with a full lease
                if now - reaped >= REAP_S:
                    await asyncio.to_thread(self._reap)
                    reaped = now
                failing = False
            except Exception as exc:
                if not failing:  # once per outage, not four times a second
                    log.warning("jobs: the store did not answer (%s); retrying", exc)
                failing = True

    def _stop(self, job_id: str) -> None:
        job = self.live.get(job_id)
        if job is not None and job.task is not None and job.status not in TERMINAL_STATUSES:
            log.info("job %s: cancelled through another process", job_id)
            job.task.cancel()

    def _reap(self) -> None:
        with self.store.db.exclusive(REAPER_LOCK) as held:
            if not held:
                return  # another process is reaping right now
            reaped = self.store.reap(spare=self.owner)
        if reaped:
            log.warning(
                "%d job(s) whose process is gone marked failed: %s", len(reaped), INTERRUPTED
            )

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
        self._write_progress(job)
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
        written = self.store.update(
            job.id, status, result=result, error=error, progress=(job.step, job.total)
        )
        ended = job.snapshot()
        if not written and (stored := self.store.get(job.id)) is not None:
            # Another process ended the record first (this one's lease had run out): every
            # reader sees the record, so this job's subscribers are told the same end.
            ended = stored
        event = terminal_event(ended)
        for queue in job.subscribers:
            queue.put_nowait(event)
        job.subscribers.clear()
        self.live.pop(job.id, None)

    def _publish(self, job: LiveJob, kind: str, data: dict[str, Any]) -> None:
        event = Event(kind, {"id": job.id, "status": job.status, **data})
        for queue in job.subscribers:
            queue.put_nowait(event)

    def _write_progress(self, job: LiveJob) -> None:
        now = time.monotonic()
        if now - job.written >= PROGRESS_WRITE_S or job.step >= job.total:
            job.written = now
            self.store.progress(job.id, job.step, job.total)


def record_events(job: Job) -> list[Event]:
    """What a client of another process's in-flight job is told first: the events a local
    job's state_events gives, from its record (which keeps no queue position or batch
    detail)."""
    base = {"id": job.id, "status": job.status}
    if job.status == "queued":
        return [Event("queued", {**base, "position": job.queue_position})]
    events = [Event("started", base)]
    if job.progress is not None:
        events.append(
            Event("progress", {**base, "step": job.progress.step, "total": job.progress.total})
        )
    return events


def record_changes(before: Job, after: Job) -> list[Event]:
    """The events between two reads of another process's job's record."""
    if after.status in TERMINAL_STATUSES:
        return [terminal_event(after)]
    if after.status != before.status:
        return record_events(after)
    if after.progress is not None and after.progress != before.progress:
        return record_events(after)[1:]
    return []
