"""The device worker: one thread owns a device's pipelines, takes work from a bounded queue
(counted in images) and runs compatible requests as one micro-batched pipeline call.

The event loop never runs GPU work; it submits and awaits. FIFO across batch keys: the oldest
queued request always decides the next batch, so no key starves.

A device fault (a CUDA error other than out-of-memory) is sticky: the CUDA context is corrupt
and every later call would fail or, worse, return garbage. The worker fails the running and
queued work with DeviceFaultError, refuses all later work, and tells its owner (`on_fault`),
who takes the server out of service so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from models import prompt_weights
from models.base import (
    NO_EVENTS,
    BackendError,
    DeviceFaultError,
    Events,
    GeneratedImage,
    GenerationParams,
    InvalidParamsError,
    OutOfMemoryError,
    QueueFullError,
    WorkCancelledError,
)
from models.local.activations import ActivationMemory
from models.local.fair import FairShare
from models.local.pipeline import BatchOutput
from models.local.residency import Residency, Resident
from models.local.runtime import describe_device_fault, is_fatal_device_error

log = logging.getLogger(__name__)

BatchKey = tuple[Any, ...]

# What a client learns of an unexpected failure: the exception (with its traceback) is logged,
# its text can quote internals (paths, tensor shapes, library state) and is never returned.
GENERATION_FAILED = "generation failed on the device; the server log has the details"


def batch_key(params: GenerationParams) -> BatchKey:
    """Requests that may share one pipeline call. Whether a negative prompt is set is part of
    the key: SDXL zeroes absent negative embeddings but encodes "" for present-but-empty ones,
    so mixing them would change the pixels of the requests without one.

    The task is too: each runs its own pipeline, so an edit never shares a call with a
    text-to-image request. So is strength, which cuts the schedule of the whole call (the
    input images themselves differ per request: they go in as one list). The mask's feather
    and the inpaint area only shape each request's own crop and paste-back; they are in the
    key all the same, so that the requests of a call differ in nothing but prompt, seed and
    input pixels, and give exactly what each would alone."""
    return (
        params.model,
        params.width,
        params.height,
        params.steps,
        params.guidance_scale,
        params.scheduler,
        params.negative_prompt is not None,
        params.output_format,
        params.output_compression,
        params.task,
        params.strength,
        params.mask_blur,
        params.inpaint_area,
        params.inpaint_padding,
        # The embeddings of one call share a length: chunks of the attention syntax's BREAK
        # (models.prompt_weights), the larger of the prompt's and the negative's.
        max(
            prompt_weights.chunk_count(params.prompt),
            prompt_weights.chunk_count(params.negative_prompt),
        ),
        # One call runs one adapter set; in order, since the order LoRAs are summed in shows.
        tuple((lora.name, lora.sha256, lora.weight) for lora in params.loras),
    )


class Runner(Protocol):
    """What the worker needs of a pipeline (models.local.pipeline.PipelineRunner)."""

    def load(self) -> None: ...

    def interrupt(self) -> None: ...

    def run_batch(
        self,
        batch: list[GenerationParams],
        *,
        precise: bool = False,
        on_step: Callable[[int, int, Callable[[int], Any]], None] | None = None,
        low_memory: bool = False,
    ) -> Any: ...


class WorkerObserver(Protocol):
    """Hooks for metrics (the server's Prometheus collector implements this)."""

    def batch_done(
        self, model: str, images: int, device_seconds: float, queue_waits: list[float]
    ) -> None: ...

    def queue_depth(self, device: str, images: int) -> None: ...


@dataclass(frozen=True)
class ItemResult:
    images: list[GeneratedImage]
    device_seconds: float  # this request's share of the batch's device time


@dataclass(frozen=True)
class Demand:
    """What a request asks of a device, for admission: its images, and its work in
    step-megapixels (images x steps x megapixels, which a step's cost grows with), priced in
    device-seconds at the model's measured rate. So one 1024x1024 50-step request counts for
    what it costs, not like a 64x64 4-step one."""

    model: str
    images: int
    work: float = 0.0

    @classmethod
    def of(cls, params: GenerationParams) -> Demand:
        steps = params.steps or 1
        if params.strength is not None and params.task != "txt2img":
            steps = max(1, math.ceil(steps * params.strength))  # only the schedule's tail runs
        return cls(params.model, params.n, params.n * steps * params.width * params.height / 1e6)


@dataclass
class WorkItem:
    params: GenerationParams
    runner: Runner
    precise: bool = False
    events: Events = NO_EVENTS
    future: concurrent.futures.Future[ItemResult] = field(default_factory=concurrent.futures.Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # The place last reported through `events.queued` (reported again only when it moves).
    reported_position: int | None = None
    # The model `runner` runs, as the worker's Residency knows it: made resident (loaded, or
    # brought back from host RAM, others evicted to fit) right before its batch runs.
    resident: Resident | None = None
    # The working memory one image of it takes by its family's prior, in bytes (for its size
    # and the device's dtype): what the worker assumes until it has measured (0: no estimate).
    memory_prior: int = 0

    @property
    def key(self) -> BatchKey:
        return (*batch_key(self.params), self.precise)

    @property
    def images(self) -> int:
        return self.params.n

    @property
    def demand(self) -> Demand:
        return Demand.of(self.params)


class DeviceWorker:
    def __init__(
        self,
        *,
        name: str = "cpu",
        max_batch_images: int = 8,
        batch_window_s: float = 0.005,
        max_queue_images: int = 64,
        max_queue_seconds: float | None = None,
        observer: WorkerObserver | None = None,
        on_fault: Callable[[str], None] | None = None,
        residency: Residency | None = None,
        threads: int | None = None,
    ) -> None:
        """`on_fault(message)` is called once, from the worker thread, when the device fails
        for good (see the module's docstring); it must not block. `residency` decides what
        stays loaded (default: every model that loads stays, without a budget). `threads`
        limits the worker's own intra-op threads (a CPU split into several devices: each gets
        its share of the cores, not all of them each)."""
        self.name = name
        self.threads = threads
        self.residency = residency or Residency(device=name, budget_bytes=None)
        # The measured working memory of its batches (models.local.activations).
        self.memory = ActivationMemory()
        self.max_batch_images = max_batch_images
        self.batch_window_s = batch_window_s
        self.max_queue_images = max_queue_images
        # The bound in estimated device-seconds of waiting work (None: images only).
        self.max_queue_seconds = max_queue_seconds
        # Device-seconds per step-megapixel, per model (exponentially averaged).
        self._seconds_per_work: dict[str, float] = {}
        self.observer = observer
        self.on_fault = on_fault
        self._fault: str | None = None
        self._queue: deque[WorkItem] = deque()
        self._fair = FairShare()
        self._cond = threading.Condition()
        self._running: list[WorkItem] = []
        self._running_runner: Runner | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Recent throughput (images/s, exponentially averaged) for Retry-After estimates.
        self._images_per_s: float | None = None
        # Requests in the last batch: the gathering window is only worth waiting when
        # requests have recently come together (see _gather).
        self._last_batch_requests = 1
        self._last_batch_end = -math.inf
        self._recent_active = 1
        self.pipeline_calls = 0
        self._control: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def fault(self) -> str | None:
        """What failed on the device ("illegal memory access (AcceleratorError)"), once it has;
        from then on every request is refused."""
        return self._fault

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name=f"imagegen-worker-{self.name}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            _set_exception(item.future, WorkCancelledError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- submitting ----------------------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn` on the worker thread (loading weights: the thread that owns the
        pipelines is the only one that touches them)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._fault is not None:
                future.set_exception(self._fault_error())
                return future
            self._control.append((fn, future))
            self._cond.notify_all()
        self.start()
        return future

    def queued_images(self) -> int:
        """Images waiting or running on this device."""
        with self._cond:
            waiting = sum(i.images for i in self._queue if not i.cancelled)
            return waiting + sum(i.images for i in self._running)

    def expected_wait_s(self) -> float:
        """How long new work would wait here: the work ahead priced at the measured rates
        (where a model is not measured yet, its images at the device's image rate)."""
        with self._cond:
            return self._drain_s()

    def estimate_s(self, demand: Demand) -> float | None:
        """The device-seconds `demand` should take here: its work at its model's measured
        rate, or the mean rate of the models measured so far; None before any is."""
        rate = self._seconds_per_work.get(demand.model)
        if rate is None and self._seconds_per_work:
            rate = sum(self._seconds_per_work.values()) / len(self._seconds_per_work)
        return None if rate is None else demand.work * rate

    def make_resident(self, resident: Resident) -> concurrent.futures.Future[Any]:
        """Load `resident` (or bring it back from host RAM) on the worker thread, within the
        device's budget."""
        return self.call(lambda: self.residency.ensure(resident))

    def admit(self, demand: Demand) -> None:
        """Raise what `submit` would refuse `demand` for, now."""
        with self._cond:
            self._check_room(demand)

    def submit(self, item: WorkItem) -> WorkItem:
        with self._cond:
            self._check_room(item.demand)
            self._queue.append(item)
            self._notify_depth()
            moved = self._moved_positions()
            self._cond.notify_all()
        self.start()
        _report_positions(moved)
        return item

    def cancel(self, item: WorkItem) -> None:
        """Queued work is dropped before it runs; a running batch stops at the next step
        once every request in it is cancelled."""
        with self._cond:
            item.cancelled = True
            moved: list[tuple[WorkItem, int]] = []
            if item in self._queue:
                self._queue.remove(item)
                self._notify_depth()
                moved = self._moved_positions()
                _set_exception(item.future, WorkCancelledError("cancelled while queued"))
            elif (
                item in self._running
                and all(i.cancelled for i in self._running)
                and self._running_runner is not None
            ):
                self._running_runner.interrupt()
        _report_positions(moved)

    async def run(self, item: WorkItem) -> ItemResult:
        """Submit and await; cancelling the awaiting task cancels the work."""
        self.submit(item)
        try:
            return await asyncio.wrap_future(item.future)
        except asyncio.CancelledError:
            self.cancel(item)
            raise

    def _check_room(self, demand: Demand) -> None:
        """Called with the lock held. Two bounds: the queue's images, and (where set and the
        rates are measured) its estimated device-seconds; a request alone in the queue is
        taken whatever it costs, as waiting would not make it cheaper."""
        images = demand.images
        if self._fault is not None:
            raise self._fault_error()
        if self._stopping:
            raise WorkCancelledError("the server is shutting down")
        if images > self.max_queue_images:
            # Waiting would never help: this request is larger than the whole queue.
            raise InvalidParamsError(
                f"n must be at most {self.max_queue_images} on this server (the local "
                f"queue holds {self.max_queue_images} images), got {images}",
                param="n",
            )
        queued = sum(i.images for i in self._queue if not i.cancelled)
        if queued + images > self.max_queue_images:
            raise QueueFullError(
                f"the local ({self.name}) queue is full ({queued} of {self.max_queue_images} "
                f"images queued); retry later",
                retry_after_s=max(1, math.ceil(self._drain_s())),
            )
        cost = self.estimate_s(demand)
        if self.max_queue_seconds is None or cost is None or queued == 0:
            return
        waiting = self._seconds_of(i for i in self._queue if not i.cancelled)
        if waiting + cost > self.max_queue_seconds:
            raise QueueFullError(
                f"the local ({self.name}) queue is full: {waiting:.1f} s of work queued, this "
                f"request about {cost:.1f} s more, past local.max_queue_seconds "
                f"({self.max_queue_seconds:g} s); retry later, or ask for less (steps, size, n)",
                retry_after_s=max(1, math.ceil(self._drain_s())),
            )

    def _seconds_of(self, items: Iterable[WorkItem]) -> float:
        """The estimated device-seconds of `items` (those of an unmeasured model at the
        device's image rate)."""
        total = 0.0
        for item in items:
            cost = self.estimate_s(item.demand)
            total += cost if cost is not None else item.images / (self._images_per_s or 1.0)
        return total

    def _drain_s(self) -> float:
        """When the work waiting and running now should be done. Called with the lock held."""
        return self._seconds_of([*self._queue, *self._running])

    def _fault_error(self) -> DeviceFaultError:
        return DeviceFaultError(
            f"the device failed ({self._fault}); the server must be restarted", provider="local"
        )

    def _retry_after(self, images_ahead: int) -> int:
        rate = self._images_per_s or 1.0
        return max(1, math.ceil(images_ahead / rate))

    def _moved_positions(self) -> list[tuple[WorkItem, int]]:
        """Queued items whose place changed since it was last reported, with the new place
        (1 runs next). Called with the lock held; reported after it is released."""
        moved = []
        for place, item in enumerate(self._fair_order(), start=1):
            if item.reported_position != place:
                item.reported_position = place
                moved.append((item, place))
        return moved

    def _fair_order(self) -> list[WorkItem]:
        """The live queued items in the order they are to run (models.local.fair). Called
        with the lock held."""
        live = (item for item in self._queue if not item.cancelled)
        return self._fair.order(live, owner=lambda i: i.params.owner, images=lambda i: i.images)

    def _notify_depth(self) -> None:
        if self.observer is not None:
            waiting = sum(i.images for i in self._queue if not i.cancelled)
            self.observer.queue_depth(self.name, waiting)

    # -- the worker thread ---------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads is not None:
            import torch

            # Per thread (OpenMP's setting is the calling thread's): this worker's calls.
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while (
                    not self._queue
                    and not self._control
                    and not self._stopping
                    and self._fault is None
                ):
                    # Idle: wake when an idle unload (idle_unload_s) falls due.
                    due = self.residency.next_sweep_s()
                    if due is not None and due <= 0:
                        break
                    self._cond.wait(due)
                if self._stopping or self._fault is not None:
                    return
                control = self._control.popleft() if self._control else None
                idle = not self._queue and control is None
            if idle:
                self.residency.sweep()
                continue
            if control is not None:
                fn, future = control
                # A caller that gave up (a load whose request went away) cancelled its future:
                # skip the call, and never try to set a result on a cancelled future, which
                # raises and would take this thread down.
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        # Moving weights to the device is where a broken one often shows.
                        if is_fatal_device_error(exc):
                            self._fail_device(exc, [future])
                        else:
                            future.set_exception(exc)
                continue
            batch = self._gather()
            if batch:
                self._run(batch)

    def _gather(self) -> list[WorkItem]:
        """The oldest request decides the key; compatible requests that are queued, or that
        arrive within the gathering window, join it up to the batch size. The window is waited
        only while company is likely (the last batch was shared and has just ended, or other
        work is queued): a lone client's next request cannot arrive before it has this one's
        result, so waiting would only add latency."""
        with self._cond:
            while self._queue and self._queue[0].cancelled:
                self._queue.popleft()
            if not self._queue:
                return []
            # Owners (API keys) take turns; each one's requests run in arrival order.
            head = self._fair_order()[0]
            self._queue.remove(head)
            batch, size = [head], head.images
            # No more than one call's worth of working memory (models.local.activations):
            # what would not fit waits for the next batch rather than for this one's calls.
            fits = self._fitting(head)
            most = self.max_batch_images if fits is None else min(self.max_batch_images, fits)
            # A shared last batch only predicts company while its clients are still coming
            # back (within a window of its end): a request after a quiet spell is a new start.
            in_burst = (
                self._last_batch_requests > 1
                and head.enqueued_at - self._last_batch_end < self.batch_window_s
            )
            expect_company = in_burst or bool(self._queue)
            deadline = time.monotonic() + (self.batch_window_s if expect_company else 0.0)
            # Gather while requests keep arriving: concurrent clients send their next request
            # a few ms apart (as their previous results are sent back one by one), so a quiet
            # gap of half a window means the burst is over and waiting longer only adds
            # latency (to a client that is now alone, say).
            quiet_s = self.batch_window_s / 2
            last_arrival = max(time.monotonic(), head.enqueued_at) if expect_company else 0.0
            while True:
                for item in self._fair_order():
                    if size >= most:
                        break
                    if item.cancelled or item.key != head.key or item.runner is not head.runner:
                        continue
                    if size + item.images > most:
                        continue
                    self._queue.remove(item)
                    batch.append(item)
                    size += item.images
                    last_arrival = max(last_arrival, time.monotonic())
                now = time.monotonic()
                # Short of the requests recently active, a longer quiet gap is allowed before
                # giving up on them; once they are all in, a short one ends the batch.
                gap = quiet_s if len(batch) < self._recent_active else quiet_s / 2
                remaining = min(deadline - now, last_arrival + gap - now)
                if size >= most or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            self._running = batch
            self._running_runner = head.runner
            self._fair.served([(item.params.owner, item.images) for item in batch])
            self._last_batch_requests = len(batch)
            # Requests active now: this batch and those still waiting. Next time the worker
            # waits (within the window) for that many, so concurrent clients do not settle
            # into two half-size batches that take turns.
            self._recent_active = len(batch) + sum(1 for i in self._queue if not i.cancelled)
            self._notify_depth()
            moved = self._moved_positions()
        _report_positions(moved)
        return batch

    def _run(self, batch: list[WorkItem]) -> None:
        started = time.monotonic()
        waits = [started - item.enqueued_at for item in batch]
        for item in batch:
            _safely(item.events.started)

        runner = batch[0].runner
        rows: dict[int, list[GeneratedImage]] = {}
        device_seconds = 0.0
        try:
            if batch[0].resident is not None:
                self.residency.ensure(batch[0].resident)
            # Parts that fit the device's working room (models.local.activations), each run
            # as one call (recovering from running out of memory).
            parts = _cut([_Slice(item, item.params) for item in batch], self._fitting(batch[0]))
            if len(parts) > 1:
                self._log_split(batch[0], parts)
            spans = _spans(parts)
            for part in parts:
                if all(piece.item.cancelled for piece in part):
                    continue  # its requests were cancelled while earlier parts ran
                ran = self._recovering(runner, part, spans)
                device_seconds += ran.device_seconds
                for piece, images in ran.rows:
                    rows.setdefault(id(piece.item), []).extend(images)
        except BaseException as exc:
            if is_fatal_device_error(exc):
                self._fail_device(exc, [item.future for item in batch])
                return
            if isinstance(exc, BackendError):
                error = exc
            else:
                log.exception("pipeline call for %s failed", batch[0].params.model)
                error = BackendError(GENERATION_FAILED, provider="local")
            for item in batch:
                _set_exception(item.future, error)
            self._finish()
            return
        total_images = sum(item.images for item in batch)
        share = device_seconds / max(total_images, 1)
        if device_seconds > 0:
            rate = total_images / device_seconds
            prev = self._images_per_s
            self._images_per_s = rate if prev is None else 0.7 * prev + 0.3 * rate
            work = sum(item.demand.work for item in batch)
            model = batch[0].params.model
            if work > 0:
                per_work = device_seconds / work
                was = self._seconds_per_work.get(model)
                self._seconds_per_work[model] = (
                    per_work if was is None else 0.7 * was + 0.3 * per_work
                )
        # Observed before results are handed out: a client that has its images also sees
        # their batch in the metrics.
        if self.observer is not None:
            self.observer.batch_done(batch[0].params.model, total_images, device_seconds, waits)
        for item in batch:
            if item.cancelled:
                _set_exception(item.future, WorkCancelledError("cancelled while running"))
                continue
            if not item.future.done():
                item.future.set_result(
                    ItemResult(images=rows[id(item)], device_seconds=share * item.images)
                )
        self._finish()

    def _fitting(self, head: WorkItem) -> int | None:
        """How many images of the batch's size one call may take on this device now: the room
        its budget leaves beside the loaded models, over each image's estimated working memory
        (None: no budget, no limit)."""
        p = head.params
        return self.memory.images_that_fit(
            p.model, p.width, p.height, head.memory_prior, self.residency.activation_room()
        )

    def _log_split(self, head: WorkItem, parts: list[list[_Slice]]) -> None:
        p = head.params
        log.info(
            "%s: %d image(s) at %dx%d split into %d calls on %s (about %.2f GB of working "
            "memory each, %.2f GB of room beside the loaded models)",
            p.model,
            sum(_images(part) for part in parts),
            p.width,
            p.height,
            len(parts),
            self.name,
            self.memory.per_image(p.model, p.width, p.height, head.memory_prior) / 1024**3,
            (self.residency.activation_room() or 0) / 1024**3,
        )

    def _recovering(
        self, runner: Runner, part: list[_Slice], spans: dict[int, tuple[int, int]]
    ) -> _Ran:
        """One part's pipeline call, recovering from running out of device memory: the
        runner has freed the cache; the part runs again split in half, then (still short of
        memory) each half with the VAE decoding in tiles. Only then does the request fail,
        with a retryable out_of_memory; the worker goes on serving."""
        try:
            return self._call(runner, part, spans)
        except OutOfMemoryError:
            self._ran_out(part)
            halves = _halved(part)
            log.warning(
                "%s: out of memory for %d image(s); retrying %s",
                part[0].params.model,
                _images(part),
                "split in half" if len(halves) > 1 else "with VAE tiling",
            )
        if len(halves) > 1:
            try:
                return _joined([self._call(runner, half, spans) for half in halves])
            except OutOfMemoryError:
                pass
        try:
            return _joined([self._call(runner, half, spans, low_memory=True) for half in halves])
        except OutOfMemoryError as exc:
            raise OutOfMemoryError(
                f"{exc.message} (after retrying split in half and with VAE tiling)",
                retry_after_s=self._retry_after(self.queued_images() + 1),
            ) from None

    def _ran_out(self, part: list[_Slice]) -> None:
        """Running out of memory measures too: this size is split before it runs next time."""
        p = part[0].params
        self.memory.ran_out(p.model, p.width, p.height, _images(part))

    def _call(
        self,
        runner: Runner,
        part: list[_Slice],
        spans: dict[int, tuple[int, int]],
        *,
        low_memory: bool = False,
    ) -> _Ran:
        # Where each slice's images start among the call's.
        offsets = [0]
        for piece in part:
            offsets.append(offsets[-1] + piece.params.n)

        def on_step(step: int, total: int, render: Callable[[int], Any]) -> None:
            for piece, offset in zip(part, offsets, strict=False):
                item = piece.item
                if item.cancelled:
                    continue
                preview = None
                if _asks(item.events.wants_preview, step, total):
                    preview = tuple(render(offset + i) for i in range(piece.params.n))
                    if any(p is None for p in preview):
                        preview = None
                # A request cut into several calls counts its steps across all of them.
                done, calls = spans.get(id(piece), (0, 1))
                _safely(item.events.progress, done * total + step, calls * total, preview)
            # Asked again at every step, from the items' own state: a cancel that came while
            # the batch was being set up (before the runner armed its stop flag) still stops it.
            if all(piece.item.cancelled for piece in part):
                runner.interrupt()

        params = [piece.params for piece in part]
        if low_memory:
            output = runner.run_batch(
                params, precise=part[0].item.precise, on_step=on_step, low_memory=True
            )
        else:
            output = runner.run_batch(params, precise=part[0].item.precise, on_step=on_step)
        self.pipeline_calls += 1
        out = cast(BatchOutput, output)
        if out.peak_bytes is not None:
            p = part[0].params
            self.memory.record(p.model, p.width, p.height, _images(part), out.peak_bytes)
        return _Ran(list(zip(part, out.images, strict=True)), out.device_seconds)

    def _fail_device(
        self, exc: BaseException, running: list[concurrent.futures.Future[Any]]
    ) -> None:
        """Fail the work in hand and all that waits, refuse what comes, tell the owner. On
        the worker thread, which ends after this."""
        fault = describe_device_fault(exc)
        log.critical(
            "device %s failed (%s): refusing all work; the server must be restarted",
            self.name,
            fault,
            exc_info=exc,
        )
        with self._cond:
            self._fault = fault
            waiting = [item.future for item in self._queue]
            waiting += [future for _, future in self._control]
            self._queue.clear()
            self._control.clear()
            self._running = []
            self._running_runner = None
            self._notify_depth()
            self._cond.notify_all()
        for future in running + waiting:
            _set_exception(future, self._fault_error())
        if self.on_fault is not None:
            _safely(self.on_fault, self._fault_error().message)

    def _finish(self) -> None:
        with self._cond:
            self._last_batch_end = time.monotonic()
            self._running = []
            self._running_runner = None


def _report_positions(moved: list[tuple[WorkItem, int]]) -> None:
    for item, place in moved:
        _safely(item.events.queued, place)


def _safely(hook: Callable[..., None], *args: Any) -> None:
    """A listener's failure is its own: it must not take the queue or the worker down."""
    try:
        hook(*args)
    except Exception:
        log.exception("event listener failed")


@dataclass(frozen=True)
class _Ran:
    """What one call (or the calls of its retry, one after another) gave each slice."""

    rows: list[tuple[_Slice, list[GeneratedImage]]]
    device_seconds: float


def _joined(calls: list[_Ran]) -> _Ran:
    return _Ran(
        [row for ran in calls for row in ran.rows], sum(ran.device_seconds for ran in calls)
    )


@dataclass(frozen=True)
class _Slice:
    """A request's images in one pipeline call: all of them (its own params), or a run of
    them where the request is cut across calls (n and seed cut: image i keeps seed + i, so
    its pixels are those of one uncut call)."""

    item: WorkItem
    params: GenerationParams


def _images(part: list[_Slice]) -> int:
    return sum(piece.params.n for piece in part)


def _cut(slices: list[_Slice], limit: int | None) -> list[list[_Slice]]:
    """The slices in order, in as few parts of at most `limit` images as there can be (None:
    one part), as even as they can be (7 in threes: 3, 2, 2, so that each call's peak is the
    lowest it can be); a request across a boundary is cut there."""
    total = sum(s.params.n for s in slices)
    if limit is None or total <= limit:
        return [slices]
    count = math.ceil(total / limit)
    sizes = [total // count + (1 if i < total % count else 0) for i in range(count)]
    parts: list[list[_Slice]] = [[] for _ in sizes]
    index, room = 0, sizes[0]
    for piece in slices:
        start = 0
        while start < piece.params.n:
            if room == 0:
                index += 1
                room = sizes[index]
            take = min(room, piece.params.n - start)
            parts[index].append(_part_of(piece, start, take))
            start += take
            room -= take
    return parts


def _part_of(piece: _Slice, start: int, count: int) -> _Slice:
    if start == 0 and count == piece.params.n:
        return piece
    params = dataclasses.replace(piece.params, n=count, seed=piece.params.seed + start)
    return _Slice(piece.item, params)


def _halved(part: list[_Slice]) -> list[list[_Slice]]:
    """`part` in two of (nearly) equal images; one part where it is a single image."""
    images = _images(part)
    if images < 2:
        return [part]
    return _cut(part, (images + 1) // 2)


def _spans(parts: list[list[_Slice]]) -> dict[int, tuple[int, int]]:
    """For each slice of a request cut across calls: (calls of that request before this
    one, calls in all), so its progress runs once from 0 to the end."""
    calls: dict[int, list[_Slice]] = {}
    for part in parts:
        for piece in part:
            calls.setdefault(id(piece.item), []).append(piece)
    return {
        id(piece): (index, len(pieces))
        for pieces in calls.values()
        if len(pieces) > 1
        for index, piece in enumerate(pieces)
    }


def _asks(question: Callable[[int, int], bool], step: int, total: int) -> bool:
    """A listener's answer; one that fails is taken as no."""
    try:
        return bool(question(step, total))
    except Exception:
        log.exception("event listener failed")
        return False


def _set_exception(future: concurrent.futures.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
