"""Counting per client in a sliding window (request rates, failed key checks)."""

from __future__ import annotations

from server.http.limits import SlidingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_take_admits_up_to_the_limit_then_says_when() -> None:
    clock = Clock()
    window = SlidingWindow(60.0, clock=clock)
    assert [window.take("k", 3) for _ in range(3)] == [None, None, None]
    clock.now += 20.5
    assert window.take("k", 3) == 40  # the first event leaves the window in 39.5 s
    assert window.take("other", 3) is None  # per client
    clock.now += 39.5
    assert window.take("k", 3) is None


def test_record_counts_even_when_full_and_full_records_nothing() -> None:
    clock = Clock()
    window = SlidingWindow(60.0, clock=clock)
    for _ in range(5):
        window.record("addr", 2)
    assert window.full("addr", 2) == 60
    clock.now += 59.9
    assert window.full("addr", 2) == 1  # never 0: Retry-After is at least 1
    clock.now += 0.2
    assert window.full("addr", 2) is None


def test_memory_is_bounded_by_clients_and_limit() -> None:
    window = SlidingWindow(60.0, max_clients=100, clock=Clock())
    for client in range(1000):
        for _ in range(10):
            window.record(str(client), 3)
    assert len(window._times) == 100
    assert all(len(times) == 3 for times in window._times.values())
