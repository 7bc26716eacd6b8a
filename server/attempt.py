"""What the service's steps hand each other: one model's attempt at one request (`Attempt`),
and a request resolved without running it (`PreparedRequest`, for dry runs and budgets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.base import Backend, GenerationParams
from server.cost import Estimate
from server.request import ImageRequest
from server.router import Candidate


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

    @property
    def provider(self) -> str:
        return self.backend.provider
