"""Per-key daily quotas: images generated and USD spent per UTC day, read from the ledger (so
they outlive a restart, and hold across processes sharing it) plus the work this process has
admitted and not yet booked (so concurrent requests cannot all pass on the same reading).

Exact within a process: a check and a booking take the same lock, and a hold stops counting
in the same critical section that writes its ledger row, so no request is counted twice or
not at all. Across processes each sees the others' work once it is booked; requests racing in
two processes may pass a limit by at most what they were running at once."""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from server import errors
from server.ledger import Ledger, utc_day_start

DAY_S = 86400


@dataclass(frozen=True)
class KeyLimits:
    """What one API key may do (server.api_keys); None: no limit of that kind."""

    requests_per_minute: int | None = None
    images_per_day: int | None = None
    usd_per_day: float | None = None

    @property
    def daily(self) -> bool:
        return self.images_per_day is not None or self.usd_per_day is not None


NO_LIMITS = KeyLimits()


@dataclass(frozen=True)
class Caller:
    """Who a request is for: the ledger's `caller` ("key:<name or digest>", or "addr:<host>"
    with keys off; "" for the CLI and other in-process callers), the owner the device queue
    shares its turns between, and that key's limits."""

    id: str = ""
    limits: KeyLimits = NO_LIMITS


# A request made in-process (the CLI, a test): one owner, no limits.
IN_PROCESS = Caller()


@dataclass
class Hold:
    """One admitted request's share of its caller's day until its ledger row is written."""

    caller: str
    images: int
    usd: float
    booked: bool = False


class Quotas:
    def __init__(self, ledger: Ledger, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.wall_clock = wall_clock
        self._lock = threading.Lock()
        self._held: dict[str, list[Hold]] = {}

    def hold(self, caller: Caller, images: int, usd: Callable[[], float]) -> Hold | None:
        """Admit `images` costing about `usd()` (asked only where a USD limit applies) for
        `caller`, or raise the limit it would pass. None where the caller has no daily
        limit; otherwise the hold counts until `booking` or `release`."""
        limits = caller.limits
        if not limits.daily:
            return None
        estimate = usd() if limits.usd_per_day is not None else 0.0
        with self._lock:
            since = self._day_start()
            booked_images, booked_usd = self.ledger.usage_since(since, caller.id)
            waiting = self._held.get(caller.id, [])
            used_images = booked_images + sum(h.images for h in waiting)
            used_usd = booked_usd + sum(h.usd for h in waiting)
            retry = max(1, math.ceil(since + DAY_S - self.wall_clock()))
            if limits.images_per_day is not None and used_images + images > limits.images_per_day:
                raise errors.ImageQuotaError(
                    f"this API key's daily quota of {limits.images_per_day} images would be "
                    f"passed ({used_images} generated or running today, this request {images});"
                    f" it resets at {_utc(since + DAY_S)}. Ask the operator to raise "
                    "images_per_day for this key",
                    retry_after_s=retry,
                )
            if limits.usd_per_day is not None and used_usd + estimate > limits.usd_per_day + 1e-12:
                raise errors.SpendQuotaError(
                    f"this API key's daily spend cap of ${limits.usd_per_day:.2f} would be "
                    f"passed (${used_usd:.4f} spent or running today, this request about "
                    f"${estimate:.4f}); it resets at {_utc(since + DAY_S)}. Ask the operator "
                    "to raise usd_per_day for this key",
                    retry_after_s=retry,
                )
            held = Hold(caller.id, images, estimate)
            self._held.setdefault(caller.id, []).append(held)
            return held

    @contextmanager
    def booking(self, held: Hold | None) -> Iterator[None]:
        """Around the write of `held`'s ledger row: from the row on, the ledger counts it."""
        if held is None:
            yield
            return
        with self._lock:
            yield
            self._forget(held)

    def release(self, held: Hold | None) -> None:
        """The request is over: what it held and did not book (cancelled, refused, failed
        with nothing to bill) stops counting."""
        if held is not None:
            with self._lock:
                self._forget(held)

    def _forget(self, held: Hold) -> None:
        if held.booked:
            return
        held.booked = True
        waiting = self._held.get(held.caller, [])
        waiting.remove(held)
        if not waiting:
            self._held.pop(held.caller, None)

    def _day_start(self) -> float:
        return utc_day_start(self.wall_clock())


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat()
