"""What the service's steps hand each other: one model's attempt at one request (`Attempt`),
a request resolved without running it (`PreparedRequest`, for dry runs and budgets), and the
one place a backend resolves a request (`Resolver`: who may run at once)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any

from models.base import Backend, GenerationParams
from server.cost import Estimate
from server.quotas import Hold
from server.request import ImageRequest
from server.router import Candidate
from server.store.claims import Claim


@dataclass(frozen=True)
class PreparedRequest:
    """A request validated and resolved exactly as `generate` would, without running it: what
    batch dry runs and budget reservations price."""

    params: GenerationParams
    backend: Backend
    revised_prompt: str
    cache_key: str
    # The request came with a seed and its result is in the cache: `generate` serves it free.
    cached: bool
    # What running it is expected to cost (0 with the basis "served from the cache" if cached).
    estimate: Estimate

    @property
    def provider(self) -> str:
        return self.backend.provider


@dataclass
class Attempt:
    """One model of the route trying one request: everything the steps after routing share."""

    request_id: str
    request: ImageRequest
    candidate: Candidate
    backend: Backend
    # The request as this model sees it (its size defaults, steps, guidance, scheduler).
    params: GenerationParams
    key: str
    identity: dict[str, Any]
    started: float
    timings: dict[str, float] = field(default_factory=dict)
    # The caller's daily quotas held for this attempt while it runs (server.quotas).
    held: Hold | None = None
    # The cross-process claim it runs under (server.flight.SharedFlight), if any.
    claim: Claim | None = None

    @property
    def provider(self) -> str:
        return self.backend.provider


class Resolver:
    """Runs `backend.resolve`, the prompt check and the identity for one model. What a model
    may do on first use (load a tokenizer, hash weights into the data directory) is not safe to
    do twice at once: first uses take turns. After it, a resolve is dictionary lookups under
    the model's own lock (a fast tokenizer is not thread-safe), so a warm model never waits on
    another model's first use, and a caller may run it on the event loop."""

    def __init__(self) -> None:
        self._first_use = threading.Lock()
        self._warm: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}

    def warm(self, model: str) -> bool:
        return model in self._warm

    def resolve(
        self, backend: Backend, params: GenerationParams
    ) -> tuple[GenerationParams, dict[str, Any]]:
        name = params.model
        first_use = contextlib.nullcontext() if name in self._warm else self._first_use
        with first_use, self._locks.setdefault(name, threading.Lock()):
            params = backend.resolve(params)
            backend.check_prompt(params.prompt)
            identity = backend.identity(params).as_dict()
        self._warm.add(name)
        return params, identity
