"""The dry run: every row checked as a run would check it, and its cost projected per model and
provider from the service's own estimates, before anything is generated or spent."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from server import errors
from server.batch.rows import BatchRow
from server.service import ImageService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowProblem:
    row: int
    line: int
    message: str
    param: str | None = None

    def describe(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class ModelProjection:
    """Projected cost of the rows for one model. `usd` covers the rows with a figure;
    `unpriced_rows` have none (a local model never run here, a hosted one without a price)."""

    provider: str
    model: str
    rows: int
    images: int
    cached_rows: int
    usd: float
    unpriced_rows: int
    basis: str


@dataclass(frozen=True)
class BatchPlan:
    total: int
    # Rows an earlier run of this folder already finished (not projected).
    finished: int
    valid: int
    problems: tuple[RowProblem, ...]
    models: tuple[ModelProjection, ...]

    @property
    def usd(self) -> float:
        return sum(m.usd for m in self.models)

    @property
    def unpriced_rows(self) -> int:
        return sum(m.unpriced_rows for m in self.models)

    def by_provider(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for m in self.models:
            totals[m.provider] = totals.get(m.provider, 0.0) + m.usd
        return dict(sorted(totals.items()))


@dataclass
class _Tally:
    rows: int = 0
    images: int = 0
    cached: int = 0
    usd: float = 0.0
    unpriced: int = 0
    basis: str = ""


def plan_batch(
    service: ImageService, rows: Sequence[BatchRow], *, finished: Iterable[int] = ()
) -> BatchPlan:
    """Check every row as `generate` would (fields, preset, sanitizer, model, sizes) and
    project its cost with the service's estimate (`PreparedRequest.estimate`: measured device
    time for local models, the price table or past spend for hosted ones). Runs nothing and
    spends nothing."""
    done = set(finished)
    problems: list[RowProblem] = []
    tallies: dict[tuple[str, str], _Tally] = {}
    valid = 0
    for row in rows:
        if row.row in done:
            continue
        if row.request is None:
            problems.append(RowProblem(row.row, row.line, row.error or "invalid row", row.param))
            continue
        try:
            prepared = service.prepare(row.request)
        except errors.ImagegenError as exc:
            problems.append(RowProblem(row.row, row.line, exc.message, exc.param))
            continue
        except Exception:
            # Internal text stays in the log; the row says where to look.
            log.exception("dry run: row %d (line %d)", row.row, row.line)
            problems.append(RowProblem(row.row, row.line, "internal error; it has been logged"))
            continue
        valid += 1
        tally = tallies.setdefault((prepared.provider, prepared.params.model), _Tally())
        tally.rows += 1
        tally.images += prepared.params.n
        if prepared.cached:
            tally.cached += 1
            continue
        tally.basis = tally.basis or prepared.estimate.basis
        if prepared.estimate.usd is None:
            tally.unpriced += 1
        else:
            tally.usd += prepared.estimate.usd
    models = tuple(
        ModelProjection(
            provider=provider,
            model=model,
            rows=t.rows,
            images=t.images,
            cached_rows=t.cached,
            usd=t.usd,
            unpriced_rows=t.unpriced,
            basis=t.basis or "served from the cache",
        )
        for (provider, model), t in sorted(tallies.items())
    )
    return BatchPlan(
        total=len(rows),
        finished=len(done & {r.row for r in rows}),
        valid=valid,
        problems=tuple(problems),
        models=models,
    )
