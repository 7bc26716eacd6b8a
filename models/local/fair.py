"""The order a device queue serves its owners in: fair between owners, FIFO within each.

Start-time fair queueing, counted in images: every owner has a virtual time that grows by the
images it is served; the queue serves the owner whose next request starts earliest. An owner
that had nothing queued starts from the virtual time of the work now being served, so a
quiet spell does not bank turns for a later burst, and a burst from one owner (one API key
sending a hundred requests) takes turns with everyone else instead of going first. With a
single owner (the CLI, or a server without keys and one client) it is plain FIFO."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")

# Owners whose virtual time is remembered; past it the least recently served is forgotten
# (and starts again from the current virtual time, which is what it would get anyway once
# its queue had run dry).
MAX_OWNERS = 4096


class FairShare:
    def __init__(self, *, max_owners: int = MAX_OWNERS) -> None:
        self.max_owners = max_owners
        self._finish: OrderedDict[str, float] = OrderedDict()
        # The virtual time of the work served last: where an owner coming back starts.
        self._now = 0.0

    def order(
        self, items: Iterable[T], owner: Callable[[T], str], images: Callable[[T], int]
    ) -> list[T]:
        """`items` (in arrival order) in the order they are to be served."""
        queues: dict[str, list[T]] = {}
        for item in items:
            queues.setdefault(owner(item), []).append(item)
        if len(queues) <= 1:
            return [item for queue in queues.values() for item in queue]
        starts = {name: max(self._finish.get(name, 0.0), self._now) for name in queues}
        arrival = {name: index for index, name in enumerate(queues)}
        heads = dict.fromkeys(queues, 0)
        ordered: list[T] = []
        while heads:
            # Earliest start first; between equal starts, the owner that arrived first.
            name = min(heads, key=lambda n: (starts[n], arrival[n]))
            queue, at = queues[name], heads[name]
            ordered.append(queue[at])
            starts[name] += max(1, images(queue[at]))
            if at + 1 == len(queue):
                del heads[name]
            else:
                heads[name] = at + 1
        return ordered

    def served(self, owners: Sequence[tuple[str, int]]) -> None:
        """A batch starts with these (owner, images): each owner's virtual time moves on."""
        for name, count in owners:
            start = max(self._finish.get(name, 0.0), self._now)
            self._finish[name] = start + max(1, count)
            self._finish.move_to_end(name)
            self._now = max(self._now, start)
        while len(self._finish) > self.max_owners:
            self._finish.popitem(last=False)
