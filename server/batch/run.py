"""Running a batch: every row the folder has not finished, through the one ImageService path,
`concurrency` at a time, under the budget; each outcome is recorded in the manifest as it
happens (then reported to `on_row`), so a cancel or a kill loses at most rows in flight.

Crash safety, in the order things happen to one row:
1. seeds: every row without a seed gets one, recorded in `seeds.jsonl` (one write + fsync)
   before anything runs, so a row re-run after a kill asks for the same pixels: a cache hit;
2. the service generates (cache store and ledger row happen inside it);
3. the images are written atomically into the folder;
4. one `manifest.jsonl` line is appended with a single os.write + fsync.
A SIGKILL anywhere leaves at worst a torn last line, which the next open cuts off; a row whose
line is complete is never run again, and a row without one is run again (from the cache)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.base import GenerationParams
from server import errors
from server.batch.budget import Budget, RowCost, Shape, Verdict
from server.batch.duplicates import DuplicateIndex
from server.batch.errors import BatchError
from server.batch.folder import BatchFolder
from server.batch.manifest import ManifestEntry
from server.batch.rows import BatchRow, pending_rows
from server.quotas import Caller
from server.service import (
    MAX_N,
    MAX_SEED,
    GenerationResult,
    ImageRequest,
    ImageService,
    PreparedRequest,
)
from server.store.files import atomic_write

log = logging.getLogger(__name__)

# A full device queue is back-pressure, not a failure: wait and try again this many times.
_QUEUE_FULL_RETRIES = 120
_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_INTERNAL = "internal error; it has been logged"


@dataclass(frozen=True)
class BatchOptions:
    concurrency: int = 4
    budget_usd: float | None = None
    # Local device time is measured after a row runs and jitters from call to call: a row
    # reserves this multiple of the dearest image of its shape (model, size, steps) measured
    # so far in the batch. A hosted backend's estimate (its price table) is reserved as is.
    reserve_margin: float = 2.0
    # Images within this many pHash bits of an earlier one are flagged (0 = identical).
    duplicate_distance: int = 4
    # Whose rows they are (the HTTP API's key): every row is booked, limited and queued as
    # that caller's.
    caller: Caller = field(default_factory=Caller)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise BatchError(
                "{concurrency} must be at least 1, got {value}",
                param="concurrency",
                value=self.concurrency,
            )
        if self.budget_usd is not None and not (
            math.isfinite(self.budget_usd) and self.budget_usd >= 0
        ):
            raise BatchError(
                "{budget_usd} must be a non-negative amount, got {value}",
                param="budget_usd",
                value=self.budget_usd,
            )
        if not (math.isfinite(self.reserve_margin) and self.reserve_margin >= 1):
            raise ValueError(f"reserve_margin must be at least 1, got {self.reserve_margin}")
        if self.duplicate_distance < 0:
            raise ValueError(f"duplicate_distance must be >= 0, got {self.duplicate_distance}")


@dataclass(frozen=True)
class BatchSummary:
    """The whole batch as it stands after this run (earlier runs of it included)."""

    batch_id: str
    manifest: Path
    total: int
    done: int
    failed: int
    skipped_budget: int
    # Done rows served from the cache.
    cached: int
    # Rows finished by an earlier run and not repeated by this one.
    resumed: int
    # Rows this run recorded, and the images it wrote.
    ran: int
    images: int
    # What this batch has cost, every run of it and failed attempts included (the ledger).
    cost_usd: float
    saved_usd: float
    gpu_seconds: float
    near_duplicates: int
    elapsed_s: float
    images_per_s: float
    budget_usd: float | None = None

    @property
    def unrecorded(self) -> int:
        """Rows with no outcome (the run was stopped before it reached them)."""
        return self.total - self.done - self.failed - self.skipped_budget

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["manifest"] = str(self.manifest)
        return data


RowCallback = Callable[[ManifestEntry], None]


async def run_batch(
    service: ImageService,
    rows: Sequence[BatchRow],
    folder: BatchFolder,
    *,
    options: BatchOptions = BatchOptions(),
    on_row: RowCallback | None = None,
) -> BatchSummary:
    """Run every row `folder` has not finished, `options.concurrency` at a time, and record
    each outcome in the manifest (then call `on_row` with it). One row's failure never stops
    the others; only an error writing the folder does."""
    run = _BatchRun(service, rows, folder, options, on_row)
    try:
        return await run.run()
    except BaseExceptionGroup as group:
        # TaskGroup wraps the one error that matters (the folder could not be written).
        first = group.exceptions[0]
        raise first from None


class _BatchRun:
    def __init__(
        self,
        service: ImageService,
        rows: Sequence[BatchRow],
        folder: BatchFolder,
        options: BatchOptions,
        on_row: RowCallback | None,
    ) -> None:
        self.service = service
        self.rows = rows
        self.folder = folder
        self.options = options
        self.on_row = on_row
        self.tag = folder.batch_id
        self.budget = (
            Budget(options.budget_usd, margin=options.reserve_margin)
            if options.budget_usd is not None
            else None
        )
        self.duplicates = DuplicateIndex(options.duplicate_distance)
        for entry in folder.entries:
            if entry.status == "done":
                self._learn(entry)
        # Identical requests in flight: a twin waits, then is served from the cache.
        self._inflight: dict[ImageRequest, asyncio.Event] = {}
        self._changed = asyncio.Condition()
        self._write_lock = asyncio.Lock()
        self._ran = 0
        self._images = 0

    async def run(self) -> BatchSummary:
        started = time.perf_counter()
        finished = self.folder.finished_rows()
        resumed = len(finished & {r.row for r in self.rows})
        pending = pending_rows(self.rows, finished)
        requests = self._requests_with_seeds(pending)
        slots = asyncio.Semaphore(self.options.concurrency)
        async with asyncio.TaskGroup() as group:
            for row in pending:
                request = requests.get(row.row)
                if request is None:
                    await self._record(self._failed(row, row.error or "invalid row", row.param))
                    continue
                await slots.acquire()
                try:
                    started_task = await self._dispatch(row, request, group, slots)
                except BaseException:
                    slots.release()
                    raise
                if not started_task:
                    slots.release()
        return self._summary(time.perf_counter() - started, resumed)

    def _requests_with_seeds(self, pending: Sequence[BatchRow]) -> dict[int, ImageRequest]:
        """Every valid row as it will run: tagged with the batch id and with a concrete seed
        (the row's own, or one chosen now and persisted before anything runs)."""
        chosen: dict[int, int] = {}
        requests: dict[int, ImageRequest] = {}
        for row in pending:
            if row.request is None:
                continue
            seed = row.request.seed
            if seed is None:
                seed = self.folder.seeds.get(row.row)
                if seed is None:
                    seed = chosen[row.row] = secrets.randbelow(MAX_SEED - MAX_N)
            requests[row.row] = dataclasses.replace(row.request, seed=seed, tag=self.tag)
        self.folder.record_seeds(chosen)
        return requests

    async def _dispatch(
        self,
        row: BatchRow,
        request: ImageRequest,
        group: asyncio.TaskGroup,
        slots: asyncio.Semaphore,
    ) -> bool:
        """Start the row (True: a task now owns the slot) or settle it here (False)."""
        budget = self.budget
        if budget is None:
            group.create_task(self._run_row(row, request, slots))
            return True
        try:
            prepared = self.service.prepare(request)
        except errors.ImagegenError as exc:
            await self._record(self._failed(row, exc.message, exc.param, model=request.model))
            return False
        except Exception:
            log.exception("batch row %d (line %d) could not be prepared", row.row, row.line)
            await self._record(self._failed(row, _INTERNAL, None, model=request.model))
            return False
        cost = _row_cost(prepared)

        def verdict() -> Verdict:
            return budget.decide(budget.need(cost), self.service.spent(self.tag))

        async with self._changed:
            await self._changed.wait_for(lambda: verdict() is not Verdict.WAIT)
        need = budget.need(cost)
        decided = budget.decide(need, self.service.spent(self.tag))
        if decided is Verdict.SKIP:
            await self._record(self._skipped(row, prepared, need, budget.cap_usd))
            return False
        if decided is Verdict.ALONE:
            # Nothing known about this shape's cost: run it with no other row in flight, so
            # none is started before it has priced the ones after it.
            budget.reserve(row.row, 0.0)
            await self._run_row(row, request, None)
            return False
        assert need is not None
        budget.reserve(row.row, need)
        group.create_task(self._run_row(row, request, slots, reserved=need))
        return True

    async def _run_row(
        self,
        row: BatchRow,
        request: ImageRequest,
        slots: asyncio.Semaphore | None,
        *,
        reserved: float | None = None,
    ) -> None:
        try:
            entry = await self._execute(row, request)
            if reserved is not None:
                entry = dataclasses.replace(entry, reserved_usd=reserved)
            await self._record(entry)
        finally:
            if self.budget is not None:
                self.budget.settle(row.row)
            async with self._changed:
                self._changed.notify_all()
            if slots is not None:
                slots.release()

    async def _execute(self, row: BatchRow, request: ImageRequest) -> ManifestEntry:
        while (twin := self._inflight.get(request)) is not None:
            await twin.wait()
        mine = self._inflight[request] = asyncio.Event()
        try:
            result = await self._generate(request)
        except errors.ImagegenError as exc:
            return self._failed(row, exc.message, exc.param, model=request.model)
        except Exception:
            log.exception("batch row %d (line %d) failed", row.row, row.line)
            return self._failed(row, _INTERNAL, None, model=request.model)
        finally:
            del self._inflight[request]
            mine.set()
        # Images reach the folder (atomically) before the manifest line that names them.
        names = [
            f"{row.row:06d}-{i}.{_EXT.get(img.format, 'png')}"
            for i, img in enumerate(result.images)
        ]
        duplicates = self._flag_duplicates(result, names)
        await asyncio.to_thread(self._write_images, result, names)
        entry = _done(row, result, names, duplicates)
        self._learn(entry, index=False)
        return entry

    async def _generate(self, request: ImageRequest) -> GenerationResult:
        for attempt in range(_QUEUE_FULL_RETRIES + 1):
            try:
                return await self.service.generate(
                    dataclasses.replace(request, caller=self.options.caller)
                )
            except errors.QueueFullError as exc:
                if attempt == _QUEUE_FULL_RETRIES:
                    raise
                await asyncio.sleep(min(float(exc.retry_after_s), 2.0))
        raise AssertionError("unreachable")

    def _write_images(self, result: GenerationResult, names: Sequence[str]) -> None:
        for img, name in zip(result.images, names, strict=True):
            atomic_write(self.folder.path / name, img.data)

    def _flag_duplicates(
        self, result: GenerationResult, names: Sequence[str]
    ) -> tuple[str | None, ...]:
        flags: list[str | None] = []
        for img, name in zip(result.images, names, strict=True):
            phash = str(img.quality.get("phash") or "")
            flags.append(self.duplicates.find(phash) if phash else None)
            if phash:
                self.duplicates.add(phash, name)
        return tuple(flags)

    def _learn(self, entry: ManifestEntry, *, index: bool = True) -> None:
        """What a done row (of this run or an earlier one) tells the duplicate index and the
        budget."""
        if index:
            for name, quality in zip(entry.images, entry.quality, strict=False):
                phash = str(quality.get("phash") or "")
                if phash:
                    self.duplicates.add(phash, name)
        if self.budget is not None and not entry.cached and entry.model is not None:
            shape = _shape(entry.model, entry.params)
            self.budget.learn(shape, len(entry.images), entry.cost_usd)

    async def _record(self, entry: ManifestEntry) -> None:
        async with self._write_lock:
            await asyncio.to_thread(self.folder.append, entry)
        self._ran += 1
        if entry.status == "done":
            self._images += len(entry.images)
        if self.on_row is not None:
            self.on_row(entry)

    def _failed(
        self, row: BatchRow, message: str, param: str | None, *, model: str | None = None
    ) -> ManifestEntry:
        return ManifestEntry(
            row=row.row, line=row.line, status="failed", model=model, error=message, param=param
        )

    def _skipped(
        self, row: BatchRow, prepared: PreparedRequest, need: float | None, cap_usd: float
    ) -> ManifestEntry:
        return ManifestEntry(
            row=row.row,
            line=row.line,
            status="skipped_budget",
            model=prepared.params.model,
            provider=prepared.provider,
            params=_params_record(prepared.params),
            reserved_usd=need,
            error=f"the budget of ${cap_usd:g} cannot cover this row",
        )

    def _summary(self, elapsed: float, resumed: int) -> BatchSummary:
        latest = self.folder.latest
        outcomes = [latest[r.row] for r in self.rows if r.row in latest]
        done = [e for e in outcomes if e.status == "done"]
        return BatchSummary(
            batch_id=self.tag,
            manifest=self.folder.manifest_path,
            total=len(self.rows),
            done=len(done),
            failed=sum(e.status == "failed" for e in outcomes),
            skipped_budget=sum(e.status == "skipped_budget" for e in outcomes),
            cached=sum(e.cached for e in done),
            resumed=resumed,
            ran=self._ran,
            images=self._images,
            cost_usd=self.service.spent(self.tag),
            saved_usd=sum(e.saved_usd for e in done),
            gpu_seconds=sum(e.gpu_seconds for e in done),
            near_duplicates=sum(d is not None for e in done for d in e.near_duplicate_of),
            elapsed_s=elapsed,
            images_per_s=self._images / elapsed if elapsed > 0 else 0.0,
            budget_usd=self.options.budget_usd,
        )


def _done(
    row: BatchRow,
    result: GenerationResult,
    names: Sequence[str],
    duplicates: tuple[str | None, ...],
) -> ManifestEntry:
    return ManifestEntry(
        row=row.row,
        line=row.line,
        status="done",
        model=result.model,
        provider=result.provider,
        cached=result.cached,
        images=tuple(names),
        sha256=tuple(img.sha256 for img in result.images),
        seeds=tuple(result.seeds),
        cost_usd=result.cost_usd,
        gpu_seconds=result.gpu_seconds,
        saved_usd=result.saved_usd,
        quality=tuple(img.quality for img in result.images),
        near_duplicate_of=duplicates,
        params=_params_record(result.params),
        request_id=result.request_id,
    )


def _row_cost(prepared: PreparedRequest) -> RowCost:
    params = prepared.params
    return RowCost(
        shape=_shape(params.model, _params_record(params)),
        images=params.n,
        expected_usd=prepared.estimate.usd,
        cached=prepared.cached,
        local=prepared.backend.is_local,
    )


def _shape(model: str, params: Mapping[str, Any]) -> Shape:
    return (
        model,
        int(params.get("width", 0)),
        int(params.get("height", 0)),
        params.get("steps"),
        params.get("quality"),
    )


def _params_record(p: GenerationParams) -> dict[str, Any]:
    return {
        "width": p.width,
        "height": p.height,
        "n": p.n,
        "seed": p.seed,
        "steps": p.steps,
        "guidance_scale": p.guidance_scale,
        "scheduler": p.scheduler,
        "quality": p.quality,
        "output_format": p.output_format,
        # An edit's inputs and adapters, as the PNG records them (hashes, not pixels): what a
        # reader of the manifest needs to tell two rows' work apart.
        **{k: v for k, v in p.pixel_fields().items() if k in ("inputs", "loras")},
    }
