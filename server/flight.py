"""Single flight within one process: while a seeded request runs on a backend that reproduces
it, an identical request (the same cache key) waits for it and is then served from the cache,
instead of running (and billing) the same work again. Across processes the shared store's
claims do the same (issue 14's cluster mode); this is the in-process half."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from server import errors

T = TypeVar("T")


def shared_failure(exc: errors.ServiceError) -> bool:
    """Whether the leader's failure is the request's own, so a follower would only fail the
    same way: bad parameters, content refused, a result that fails the quality check.
    Everything else (a cancel, the leader's deadline or quota, a full queue, a transient
    provider error) leaves followers to try for themselves."""
    return isinstance(exc, errors.InvalidRequestError | errors.GenerationFailedError)


class SingleFlight:
    def __init__(self) -> None:
        # Per key, the leader's outcome: None (done, or gone: look in the cache) or the
        # failure followers share.
        self._flights: dict[str, asyncio.Future[errors.ServiceError | None]] = {}

    async def run(
        self,
        key: str,
        lead: Callable[[], Awaitable[T]],
        follow: Callable[[], Awaitable[T | None]],
    ) -> T:
        """`lead()` if no one runs `key` now; else wait for whoever does, then `follow()` (the
        cache lookup). A follower that finds nothing (the leader was cancelled or failed for
        its own reasons) leads in its place."""
        while (flight := self._flights.get(key)) is not None:
            # Waited on, not awaited: a follower that is cancelled must not cancel the
            # leader's future.
            await asyncio.wait([flight])
            failure = flight.result()
            if failure is not None:
                raise failure
            answer = await follow()
            if answer is not None:
                return answer
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        outcome: errors.ServiceError | None = None
        try:
            return await lead()
        except errors.ServiceError as exc:
            if shared_failure(exc):
                outcome = exc
            raise
        finally:
            del self._flights[key]
            flight.set_result(outcome)
