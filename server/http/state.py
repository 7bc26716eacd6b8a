"""What the routes share: one AppState per app, reached through `app_state(request)`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from server.http.a1111_state import A1111State
from server.http.batches import BatchesServing
from server.http.jobs import JobRunner
from server.http.metrics import Metrics
from server.http.serving import ImagesServing, Readiness
from server.service import ImageService
from server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    service: ImageService
    metrics: Metrics
    readiness: Readiness
    serving: ImagesServing
    jobs: JobRunner
    batches: BatchesServing
    # The A1111 API's per-caller default models and calls in flight.
    a1111: A1111State
    # Whether the app built the service (and so closes it at shutdown).
    owns_service: bool
    started: float
    # Called when a named model fails to load (`imagegen serve` exits; tests just see 503).
    on_load_failed: Callable[[str], None] | None = None


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.imagegen
    return state
