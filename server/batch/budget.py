"""The hard USD cap of a batch, as pure arithmetic (no service, no I/O): what a row must reserve
before it starts, whether it may start now, must wait for rows in flight, or is skipped, and
what settling a finished row teaches about the next ones.

The caller passes in what the batch has booked so far (the ledger: every run of the batch,
failed attempts included), so reservations plus spend never pass the cap while estimates
hold."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

# Below this, two USD amounts are the same (float sums of cents).
EPSILON_USD = 1e-12

# What the price of an image depends on: model, width, height, steps, quality.
Shape = tuple[str, int, int, int | None, str | None]


@dataclass(frozen=True)
class RowCost:
    """What is known of a row's cost before it runs."""

    shape: Shape
    images: int
    # The service's estimate (PreparedRequest.estimate.usd); None when it has no figure.
    expected_usd: float | None
    cached: bool = False
    # Local device time is only measured after a row runs and jitters from call to call, so
    # a margin is reserved over it; a hosted price (the provider's table) is reserved as is.
    local: bool = True


class Verdict(enum.Enum):
    START = "start"  # reserve the need and start the row
    ALONE = "alone"  # cost unknown: run it with nothing else in flight; it prices the rest
    WAIT = "wait"  # rows in flight hold reservations: decide again when one settles
    SKIP = "skip"  # cannot fit even once everything in flight has settled


class Budget:
    def __init__(self, cap_usd: float, *, margin: float = 2.0) -> None:
        if not (math.isfinite(cap_usd) and cap_usd >= 0):
            raise ValueError(f"cap_usd must be a non-negative amount, got {cap_usd}")
        if not (math.isfinite(margin) and margin >= 1):
            raise ValueError(f"margin must be at least 1, got {margin}")
        self.cap_usd = cap_usd
        self.margin = margin
        self.reserved: dict[int, float] = {}
        # Dearest USD per image seen in this batch, by shape.
        self._per_image: dict[Shape, float] = {}

    @property
    def busy(self) -> bool:
        """Some row holds a reservation (is in flight)."""
        return bool(self.reserved)

    def headroom(self, spent_usd: float) -> float:
        return self.cap_usd - spent_usd - sum(self.reserved.values())

    def need(self, cost: RowCost) -> float | None:
        """USD to reserve for the row; None when nothing is known of its cost yet."""
        if cost.cached:
            return 0.0
        if not cost.local and cost.expected_usd is not None:
            return cost.expected_usd
        # What this batch measured for this very shape beats the service's average.
        seen = self._per_image.get(cost.shape)
        base = seen * cost.images if seen is not None else cost.expected_usd
        # Work that costs money is never priced at 0 (a free estimate would let every row in).
        return None if base is None or base <= 0 else base * self.margin

    def decide(self, need: float | None, spent_usd: float) -> Verdict:
        headroom = self.headroom(spent_usd)
        if need is None:
            if self.busy:
                return Verdict.WAIT
            return Verdict.ALONE if headroom > EPSILON_USD else Verdict.SKIP
        if need <= 0 or headroom - need >= -EPSILON_USD:
            return Verdict.START
        # In-flight rows hold reservations; as they settle, actual spend replaces them and
        # the headroom may grow back enough for this row.
        return Verdict.WAIT if self.busy else Verdict.SKIP

    def reserve(self, row: int, usd: float) -> None:
        self.reserved[row] = usd

    def settle(self, row: int) -> None:
        """The row finished (its spend is in the ledger now): release its reservation."""
        self.reserved.pop(row, None)

    def learn(self, shape: Shape, images: int, cost_usd: float) -> None:
        """A row of `shape` produced `images` for `cost_usd` (not from the cache)."""
        if images <= 0 or cost_usd <= 0:
            return
        per_image = cost_usd / images
        self._per_image[shape] = max(per_image, self._per_image.get(shape, 0.0))
