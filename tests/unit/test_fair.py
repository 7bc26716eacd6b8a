"""The device queue's order between owners (API keys): fair turns, FIFO within an owner."""

from __future__ import annotations

from models.local.fair import FairShare


def _order(share: FairShare, items: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return share.order(items, owner=lambda item: item[0], images=lambda item: 1)


def test_one_owner_is_plain_fifo() -> None:
    items = [("a", i) for i in range(5)]
    assert _order(FairShare(), items) == items


def test_a_flood_takes_turns_with_a_later_owner() -> None:
    items = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("a", 3), ("c", 0)]
    assert _order(FairShare(), items) == [
        ("a", 0),
        ("b", 0),
        ("c", 0),
        ("a", 1),
        ("a", 2),
        ("a", 3),
    ]


def test_turns_are_counted_in_images() -> None:
    """An owner whose requests ask for four images each gets a quarter of the turns of one
    asking for one: equal images, not equal requests."""
    share = FairShare()
    items = [("big", 4), ("big", 4), ("small", 1), ("small", 1), ("small", 1), ("small", 1)]
    order = share.order(items, owner=lambda item: item[0], images=lambda item: item[1])
    assert order == [("big", 4), ("small", 1), ("small", 1), ("small", 1), ("small", 1), ("big", 4)]


def test_served_owners_wait_behind_those_not_yet_served() -> None:
    share = FairShare()
    share.served([("a", 1), ("a", 1)])
    assert _order(share, [("a", 2), ("b", 0)]) == [("b", 0), ("a", 2)]


def test_a_quiet_spell_banks_no_turns() -> None:
    """b was away while a was served ten times: back, it takes turns with a from now on, it
    does not get ten turns in a row."""
    share = FairShare()
    share.served([("b", 1)])
    for _ in range(10):
        share.served([("a", 1)])
    order = _order(share, [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)])
    assert order == [("b", 0), ("a", 0), ("b", 1), ("a", 1), ("b", 2)]


def test_memory_is_bounded() -> None:
    share = FairShare(max_owners=3)
    for owner in range(10):
        share.served([(str(owner), 1)])
    assert len(share._finish) == 3
