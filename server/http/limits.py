"""Counting events per client in a sliding window, in bounded memory: the per-key request rate
(server.api_keys' requests_per_minute) and failed API-key checks per client address."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

# Clients remembered at once. Past it the one seen longest ago is forgotten: memory stays
# bounded whatever the number of addresses a client sends from (at worst such a client
# makes the limiter forget, it never makes the server run out of memory).
MAX_CLIENTS = 10_000


class SlidingWindow:
    """At most `limit` events per `window_s` per client; only the latest `limit` times of
    each client are kept, which is all the check needs."""

    def __init__(
        self,
        window_s: float = 60.0,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.max_clients = max_clients
        self.clock = clock
        self._lock = threading.Lock()
        self._times: OrderedDict[str, deque[float]] = OrderedDict()

    def full(self, client: str, limit: int) -> int | None:
        """Seconds until `client` may have another event (at least 1), or None when it may
        now. Records nothing."""
        with self._lock:
            return self._wait(client, limit, self.clock())

    def take(self, client: str, limit: int) -> int | None:
        """Record one event for `client` if the window has room; else what `full` says."""
        with self._lock:
            now = self.clock()
            wait = self._wait(client, limit, now)
            if wait is None:
                self._record(client, limit, now)
            return wait

    def record(self, client: str, limit: int) -> None:
        """Record one event whether or not the window has room (a failed check: counting
        it is the point)."""
        with self._lock:
            self._record(client, limit, self.clock())

    def _wait(self, client: str, limit: int, now: float) -> int | None:
        times = self._times.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) < limit:
            return None
        return max(1, math.ceil(times[0] + self.window_s - now))

    def _record(self, client: str, limit: int, now: float) -> None:
        times = self._times.get(client)
        if times is None or times.maxlen != limit:
            times = deque(times or (), maxlen=limit)
            self._times[client] = times
        times.append(now)
        self._times.move_to_end(client)
        while len(self._times) > self.max_clients:
            self._times.popitem(last=False)
