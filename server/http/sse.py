"""Server-sent events: the wire encoding and the stream loop (keep-alives, end on a terminal
event, or when a server that is shutting down gives up on the work)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

KEEPALIVE = b": keep-alive\n\n"
KEEPALIVE_S = 15.0
# How often an idle stream checks whether the server has given up on the work it reports.
DRAIN_CHECK_S = 0.5


@dataclass(frozen=True)
class Event:
    kind: str
    data: dict[str, Any]
    terminal: bool = False


def encode(event: Event) -> bytes:
    payload = json.dumps(event.data, separators=(",", ":"), allow_nan=False)
    return f"event: {event.kind}\ndata: {payload}\n\n".encode()


async def stream(
    initial: Iterable[Event],
    queue: asyncio.Queue[Event] | None,
    *,
    given_up: Callable[[], bool],
    farewell: Callable[[], Event | None] = lambda: None,
    on_close: Callable[[], None] = lambda: None,
) -> AsyncIterator[bytes]:
    """The current state first (a client that connects late sees where things stand), then
    live events until a terminal one. A server that drains keeps the stream open while the work
    it reports is in flight (the client gets its end); once `given_up` says the work will not
    finish, the stream ends with `farewell` (what the work's record will say)."""
    try:
        for event in initial:
            yield encode(event)
            if event.terminal:
                return
        if queue is None:
            return
        idle = 0.0
        while True:
            if given_up():
                while not queue.empty():  # the end may have come just in time
                    event = queue.get_nowait()
                    yield encode(event)
                    if event.terminal:
                        return
                last = farewell()
                if last is not None:
                    yield encode(last)
                return
            try:
                event = await asyncio.wait_for(queue.get(), timeout=DRAIN_CHECK_S)
            except TimeoutError:
                idle += DRAIN_CHECK_S
                if idle >= KEEPALIVE_S:
                    idle = 0.0
                    yield KEEPALIVE
                continue
            idle = 0.0
            yield encode(event)
            if event.terminal:
                return
    finally:
        on_close()
