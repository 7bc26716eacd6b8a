"""Which steps show a live preview (server.http.previews): a stream's partial images spread over
the schedule, one per step at most; job events and A1111's progress every k steps."""

from __future__ import annotations

import pytest

from server.http.previews import every, spread


@pytest.mark.parametrize(
    ("total", "count", "steps"),
    [
        (4, 0, set()),
        (4, 1, {2}),
        (4, 3, {1, 2, 3}),
        (30, 3, {8, 15, 23}),
        (30, 2, {10, 20}),
        # A strength of 0.5 halves the schedule: still spread over what runs.
        (2, 1, {1}),
        # Shorter than asked: one at every step, the last one included.
        (2, 3, {1, 2}),
        (1, 3, {1}),
    ],
)
def test_partials_spread_over_the_schedule(total: int, count: int, steps: set[int]) -> None:
    assert spread(total, count) == steps


def test_every_k_steps_and_zero_is_never() -> None:
    assert [s for s in range(1, 11) if every(s, 5)] == [5, 10]
    assert [s for s in range(1, 4) if every(s, 1)] == [1, 2, 3]
    assert not any(every(s, 0) for s in range(1, 11))
