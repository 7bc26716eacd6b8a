"""Single flight within one process: while a seeded request runs on a backend that reproduces
it, an identical request (the same cache key) waits for it and is then served from the cache,
instead of running (and billing) the same work again. `SingleFlight` does it within one
process (no database round trip for the common case of one server); `SharedFlight` across
every process sharing the store, through its claims."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from server import errors
from server.store.claims import Claim, Claims, FencedError

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


# Failures a claim's owner leaves for its waiters in other processes, by the `kind` stored.
_SHARED_KINDS: dict[str, type[errors.ServiceError]] = {
    "invalid": errors.InvalidRequestError,
    "filtered": errors.ContentFilteredError,
    "failed": errors.GenerationFailedError,
}


def _encoded(exc: errors.ServiceError) -> dict[str, Any] | None:
    if not shared_failure(exc):
        return None
    kind = next(
        (name for name, cls in reversed(_SHARED_KINDS.items()) if isinstance(exc, cls)), None
    )
    return {"kind": kind, "message": exc.message, "param": exc.param} if kind else None


def _decoded(failure: Mapping[str, Any]) -> errors.ServiceError:
    cls = _SHARED_KINDS.get(str(failure.get("kind")), errors.GenerationFailedError)
    return cls(str(failure.get("message", "")), param=failure.get("param"))


class SharedFlight:
    """Single flight across processes sharing the store (server/store/claims.py): the
    process that takes a key's claim runs it, heartbeating its lease; the others wait for
    the release and are answered from the cache, or take over from an owner that died. A
    fenced-out owner (it stalled past its lease and another took over) does not publish:
    it waits like any other for the new owner's result."""

    def __init__(self, claims: Claims) -> None:
        self.claims = claims

    async def run(
        self,
        key: str,
        lead: Callable[[Claim], Awaitable[T]],
        follow: Callable[[], Awaitable[T | None]],
    ) -> T:
        while True:
            claim = await asyncio.to_thread(self.claims.take, key)
            if claim is None:
                released = await self.claims.wait(key)
                if released.failure is not None:
                    raise _decoded(released.failure)
                answer = await follow()
                if answer is not None:
                    return answer
                continue  # its owner failed for its own reasons, or died: take over
            try:
                # Published between our miss and our claim: nothing to run.
                answer = await follow()
                if answer is None:
                    answer = await self._led(claim, lead)
            except FencedError:
                continue
            except errors.ServiceError as exc:
                await asyncio.to_thread(self.claims.release, claim, failure=_encoded(exc))
                raise
            finally:
                # Idempotent (a publish releases in its own transaction), and shielded: a
                # cancelled request must not leave its key held until the lease runs out.
                await asyncio.shield(asyncio.to_thread(self.claims.release, claim))
            return answer

    async def _led(self, claim: Claim, lead: Callable[[Claim], Awaitable[T]]) -> T:
        beat = asyncio.create_task(self._heartbeat(claim))
        try:
            return await lead(claim)
        finally:
            beat.cancel()

    async def _heartbeat(self, claim: Claim) -> None:
        while True:
            await asyncio.sleep(self.claims.lease_s / 3)
            if not await asyncio.to_thread(self.claims.heartbeat, claim):
                return  # fenced: the publish will refuse, and the request waits instead
