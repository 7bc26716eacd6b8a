"""The batch budget as pure arithmetic (no service, no model): what a row reserves, when it may
start, wait or is skipped, and that reservations plus spend never pass the cap while estimates
hold. The cap end to end is tested in tests/test_batch.py."""

from __future__ import annotations

import random

import pytest

from server.batch import Budget, RowCost, Verdict
from server.batch.budget import Shape

SHAPE: Shape = ("tiny-sdxl", 64, 64, 2, None)
OTHER: Shape = ("tiny-sdxl", 128, 128, 2, None)


def hosted(usd: float | None, images: int = 1) -> RowCost:
    return RowCost(
        shape=("dall-e", 1024, 1024, None, "hd"), images=images, expected_usd=usd, local=False
    )


def local(usd: float | None = None, images: int = 1, shape: Shape = SHAPE) -> RowCost:
    return RowCost(shape=shape, images=images, expected_usd=usd, local=True)


def test_a_quoted_price_is_reserved_as_is_and_rows_stop_at_the_cap() -> None:
    budget = Budget(0.055)
    spent = 0.0
    started = []
    for row in range(1, 10):
        need = budget.need(hosted(0.01))
        assert need == pytest.approx(0.01)
        verdict = budget.decide(need, spent)
        if verdict is not Verdict.START:
            break
        budget.reserve(row, need)
        started.append(row)
    # Five fit: the sixth would pass the cap while the five are in flight, so it waits.
    assert started == [1, 2, 3, 4, 5]
    assert verdict is Verdict.WAIT
    # One settles at its price: spend replaces the reservation, still no room for a sixth.
    budget.settle(1)
    spent += 0.01
    assert budget.decide(budget.need(hosted(0.01)), spent) is Verdict.WAIT
    for row in (2, 3, 4, 5):
        budget.settle(row)
        spent += 0.01
    # Nothing in flight and no room: skipped, not waited for.
    assert not budget.busy
    assert budget.decide(0.01, spent) is Verdict.SKIP
    assert budget.headroom(spent) == pytest.approx(0.005)


def test_a_settled_row_below_its_estimate_makes_room() -> None:
    budget = Budget(0.03)
    budget.reserve(1, 0.02)
    assert budget.decide(0.02, 0.0) is Verdict.WAIT
    budget.settle(1)
    assert budget.decide(0.02, 0.005) is Verdict.START


def test_cached_rows_are_free_even_with_no_headroom() -> None:
    budget = Budget(0.0)
    cost = RowCost(shape=SHAPE, images=4, expected_usd=1.0, cached=True)
    assert budget.need(cost) == 0.0
    assert budget.decide(0.0, 0.0) is Verdict.START


def test_an_unknown_cost_runs_alone_then_prices_its_shape() -> None:
    budget = Budget(1.0, margin=2.0)
    assert budget.need(local(None)) is None
    # Nothing known: alone when idle, otherwise after the rows in flight.
    assert budget.decide(None, 0.0) is Verdict.ALONE
    budget.reserve(1, 0.0)
    assert budget.decide(None, 0.0) is Verdict.WAIT
    budget.settle(1)
    # The row measured $0.03 for 2 images: the dearest image of the shape, with the margin.
    budget.learn(SHAPE, 2, 0.03)
    assert budget.need(local(None, images=3)) == pytest.approx(0.015 * 3 * 2.0)
    budget.learn(SHAPE, 1, 0.01)  # a cheaper one does not lower it
    assert budget.need(local(None)) == pytest.approx(0.03)
    # What this batch measured for the shape beats the service's average; another shape
    # falls back on the service's estimate (with the margin: device time jitters).
    assert budget.need(local(0.5)) == pytest.approx(0.03)
    assert budget.need(local(0.05, shape=OTHER)) == pytest.approx(0.1)
    assert budget.need(local(None, shape=OTHER)) is None
    # Once spend leaves no headroom, an unknown row is skipped rather than run.
    assert budget.decide(None, 1.0) is Verdict.SKIP


def test_a_zero_estimate_for_paid_work_counts_as_unknown() -> None:
    budget = Budget(1.0)
    assert budget.need(local(0.0)) is None
    budget.learn(SHAPE, 1, 0.0)  # free (cached elsewhere) rows teach nothing
    assert budget.need(local(None)) is None
    assert budget.need(hosted(0.0)) == 0.0  # a hosted price of 0 is a price


def test_a_hosted_model_without_a_price_learns_like_a_local_one() -> None:
    budget = Budget(1.0, margin=2.0)
    assert budget.need(hosted(None)) is None
    budget.learn(hosted(None).shape, 1, 0.04)
    assert budget.need(hosted(None, images=2)) == pytest.approx(0.16)


@pytest.mark.parametrize("seed", range(20))
def test_reservations_plus_spend_never_pass_the_cap_while_estimates_hold(seed: int) -> None:
    """Random rows start, wait and settle in a random order (actual cost at most the
    estimate); at every step what is booked plus what is held stays within the cap."""
    rng = random.Random(seed)
    cap = rng.uniform(0.05, 0.5)
    budget = Budget(cap, margin=2.0)
    spent = 0.0
    in_flight: dict[int, float] = {}  # row -> what it will really cost
    queue = list(range(1, 60))
    costs = {row: rng.choice([hosted(rng.uniform(0.001, 0.05)), local(None)]) for row in queue}
    while queue or in_flight:
        if queue and (not in_flight or rng.random() < 0.6):
            row = queue[0]
            cost = costs[row]
            need = budget.need(cost)
            verdict = budget.decide(need, spent)
            if verdict is Verdict.WAIT:
                assert in_flight
            else:
                queue.pop(0)
            if verdict is Verdict.START:
                assert need is not None
                budget.reserve(row, need)
                in_flight[row] = need if not cost.local else need / budget.margin
            elif verdict is Verdict.ALONE:
                assert not in_flight
                budget.reserve(row, 0.0)
                # Run alone: it may cost anything that fits the headroom it started with.
                actual = rng.uniform(0.0, budget.headroom(spent))
                budget.settle(row)
                spent += actual
                budget.learn(cost.shape, cost.images, actual)
            assert spent + sum(budget.reserved.values()) <= cap + 1e-9
            continue
        row = rng.choice(list(in_flight))
        actual = rng.uniform(0.0, in_flight.pop(row))
        budget.settle(row)
        spent += actual
        budget.learn(costs[row].shape, costs[row].images, actual)
        assert spent <= cap + 1e-9
    assert not budget.busy
