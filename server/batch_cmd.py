"""`imagegen batch`: read the file, then either project its cost (--dry-run) or run it through
server.batch with a progress bar on stderr (one plain line per row when stderr is not a
terminal) and print the summary."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, TextIO

from server.batch import (
    FIELD_NAMES,
    MANIFEST_NAME,
    BatchDefaults,
    BatchError,
    BatchFolder,
    BatchOptions,
    BatchPlan,
    BatchRow,
    BatchSummary,
    ManifestEntry,
    finished_rows,
    plan_batch,
    read_rows,
    rows_fingerprint,
    run_batch,
)
from server.service import ImageService
from server.settings import Settings

# Exit codes: 0 every row done (or skipped by the budget), 1 some row failed, 2 bad input.
EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_INVALID = 2


def run(
    settings: Settings,
    *,
    file: Path,
    out: Path,
    model: str | None = None,
    concurrency: int = 4,
    budget_usd: float | None = None,
    resume: bool = False,
    dry_run: bool = False,
    preset: str | None = None,
    allow_absolute_paths: bool = False,
) -> int:
    try:
        options = BatchOptions(concurrency=concurrency, budget_usd=budget_usd)
        defaults = BatchDefaults(
            model=model, preset=preset, allow_absolute_paths=allow_absolute_paths
        )
        rows = read_rows(file, defaults)
        if dry_run:
            return _dry_run(settings, rows, out)
        folder = BatchFolder.open(
            out, fingerprint=rows_fingerprint(rows), resume=resume, source=str(file)
        )
    except BatchError as exc:
        # The batch names its options neutrally; this edge words them as its flags.
        raise exc.spelled(cli_names(file)) from None
    with folder:
        summary = asyncio.run(_run(settings, rows, folder, options))
    print_summary(summary, sys.stdout)
    return EXIT_ROWS_FAILED if summary.failed else EXIT_OK


def cli_names(file: Path) -> dict[str, str]:
    """How `imagegen batch` spells the options a BatchError names."""
    return {
        **FIELD_NAMES,
        "file": f"FILE '{file}'",
        "out": "--out folder",
        "resume": "--resume",
        "concurrency": "--concurrency",
        "budget_usd": "--budget-usd",
        "model": "--model",
        "preset": "--preset",
    }


async def _run(
    settings: Settings, rows: list[BatchRow], folder: BatchFolder, options: BatchOptions
) -> BatchSummary:
    service = ImageService(settings)
    pending = len(rows) - len(folder.finished_rows() & {r.row for r in rows})
    progress = _RowProgress(total=len(rows), pending=pending, batch_id=folder.batch_id)
    try:
        with progress:
            return await run_batch(service, rows, folder, options=options, on_row=progress.row_done)
    finally:
        await service.aclose()


class _RowProgress:
    """A rich bar when stderr is a terminal; otherwise one plain log line per row."""

    def __init__(self, *, total: int, pending: int, batch_id: str) -> None:
        self.total = total
        self.pending = pending
        self.batch_id = batch_id
        self.counts = {"done": 0, "failed": 0, "skipped_budget": 0, "cached": 0}
        self.stream: TextIO = sys.stderr
        self._bar: Any = None
        self._task: Any = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task(self._describe(), total=pending)
        else:
            done = total - pending
            self._plain(
                f"batch {batch_id}: {total} rows, {done} already finished, {pending} to run"
            )

    def __enter__(self) -> _RowProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _describe(self) -> str:
        c = self.counts
        return (
            f"done {c['done']} (cached {c['cached']}) failed {c['failed']} "
            f"skipped {c['skipped_budget']}"
        )

    def _plain(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def row_done(self, entry: ManifestEntry) -> None:
        self.counts[entry.status] += 1
        if entry.status == "done" and entry.cached:
            self.counts["cached"] += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=self._describe())
            if entry.status == "failed":
                self._bar.console.print(f"line {entry.line}: failed: {entry.error}")
            return
        self._plain(describe_entry(entry))


def describe_entry(entry: ManifestEntry) -> str:
    where = f"row {entry.row} (line {entry.line})"
    if entry.status == "failed":
        return f"{where}: failed: {entry.error}"
    if entry.status == "skipped_budget":
        estimate = "" if entry.reserved_usd is None else f" (needs ~${entry.reserved_usd:.6f})"
        return f"{where}: skipped_budget{estimate}"
    cost = "cached $0" if entry.cached else f"${entry.cost_usd:.6f}"
    seeds = ",".join(str(s) for s in entry.seeds)
    dups = [d for d in entry.near_duplicate_of if d is not None]
    note = f" near-duplicate of {', '.join(dups)}" if dups else ""
    return (
        f"{where}: done {', '.join(entry.images)} seed {seeds} {entry.model} via "
        f"{entry.provider} {cost}{note}"
    )


def print_summary(summary: BatchSummary, stream: TextIO) -> None:
    lines = [
        f"batch {summary.batch_id}: {summary.total} rows: done {summary.done} "
        f"(cached {summary.cached}), failed {summary.failed}, "
        f"skipped_budget {summary.skipped_budget}"
        + (f", not run {summary.unrecorded}" if summary.unrecorded else ""),
        f"  this run: {summary.ran} rows, {summary.images} images in {summary.elapsed_s:.1f} s "
        f"({summary.images_per_s:.2f} images/s); {summary.resumed} rows finished earlier",
        f"  cost ${summary.cost_usd:.6f} ({summary.gpu_seconds:.3f} GPU-s), "
        f"saved ${summary.saved_usd:.6f} by the cache"
        + (f", budget ${summary.budget_usd:g}" if summary.budget_usd is not None else ""),
        f"  near-duplicate images: {summary.near_duplicates}",
        f"  manifest: {summary.manifest}",
    ]
    stream.write("\n".join(lines) + "\n")
    stream.flush()


def _dry_run(settings: Settings, rows: list[BatchRow], out: Path) -> int:
    # A dry run writes nothing: an existing manifest is only read, to leave finished rows out.
    finished = finished_rows(out / MANIFEST_NAME) if out.is_dir() else set()
    service = ImageService(settings)
    try:
        plan = plan_batch(service, rows, finished=finished)
    finally:
        service.close()
    print_plan(plan, sys.stdout)
    return EXIT_INVALID if plan.problems else EXIT_OK


def print_plan(plan: BatchPlan, stream: TextIO) -> None:
    out = [
        f"dry run: {plan.total} rows, {plan.valid} valid, {len(plan.problems)} invalid"
        + (f", {plan.finished} already finished" if plan.finished else "")
        + " (nothing was generated or spent)"
    ]
    out += [f"  {p.describe()}" for p in plan.problems]
    if plan.models:
        out.append("projected cost:")
        header = ("provider", "model", "rows", "images", "cached", "USD", "basis")
        table = [header] + [
            (
                m.provider,
                m.model,
                str(m.rows),
                str(m.images),
                str(m.cached_rows),
                f"${m.usd:.6f}"
                + (f" + {m.unpriced_rows} rows unpriced" if m.unpriced_rows else ""),
                m.basis,
            )
            for m in plan.models
        ]
        widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
        for r in table:
            cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)]
            out.append("  " + "  ".join([*cells, r[-1]]))
        per_provider = ", ".join(f"{p} ${usd:.6f}" for p, usd in plan.by_provider().items())
        out.append(f"per provider: {per_provider}")
        unpriced = f" (+ {plan.unpriced_rows} rows without a figure)" if plan.unpriced_rows else ""
        out.append(f"total: ${plan.usd:.6f}{unpriced}")
    stream.write("\n".join(out) + "\n")
    stream.flush()
