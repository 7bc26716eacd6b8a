"""The app factory: one FastAPI app over one ImageService, with auth and request-id middleware,
the OpenAI error envelope, and a start-up that loads and warms the named models in the
background (so /livez answers at once and /readyz turns 200 when they are ready)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from models import base
from models.catalogue import Catalogue
from server import errors
from server.http import (
    a1111,
    routes_batches,
    routes_images,
    routes_jobs,
    routes_loras,
    routes_models,
    routes_ops,
)
from server.http import errors as http_errors
from server.http.a1111_state import A1111State
from server.http.auth import ApiKeys, AuthMiddleware
from server.http.batches import BatchesServing
from server.http.job_store import JobStore
from server.http.jobs import JobRunner
from server.http.metrics import Metrics
from server.http.middleware import BodyLimitMiddleware, RequestContextMiddleware
from server.http.security import SecurityHeadersMiddleware
from server.http.serving import ImagesServing, Readiness
from server.http.state import AppState
from server.registry import BackendRegistry
from server.service import ImageService
from server.settings import Settings

log = logging.getLogger("server.http")
# How often the store's housekeeping runs (the cache's orphan sweep): its grace period, so an
# orphan lives at most about twice that.
MAINTAIN_S = 10 * 60


def create_app(settings: Settings, service: ImageService | None = None) -> FastAPI:
    """The HTTP API over `service` (built from `settings` when None, and then closed with the
    app). Models named in settings.server.models, and pinned ones, load and warm up after
    start-up."""
    metrics = Metrics()
    owns_service = service is None
    if service is None:
        registry = BackendRegistry(settings, Catalogue.load(settings.models), observer=metrics)
        service = ImageService(settings, registry=registry)
    else:
        service.watch_device(metrics)
    # Pinned models (local.model_policies) load at start-up too: they are never evicted.
    pinned = [n for n, p in settings.local.model_policies.items() if p.pinned]
    startup = [*settings.server.models, *(n for n in pinned if n not in settings.server.models)]
    readiness = Readiness(startup, fault=service.device_fault)
    serving = ImagesServing(settings, service, metrics, readiness)
    jobs = JobRunner(JobStore(service.db), serving)
    state = AppState(
        settings=settings,
        service=service,
        metrics=metrics,
        readiness=readiness,
        serving=serving,
        jobs=jobs,
        batches=BatchesServing(settings, service, jobs, readiness),
        a1111=A1111State(service.db),
        owns_service=owns_service,
        started=time.time(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.jobs.start()
        state.batches.prune()
        loading = asyncio.create_task(_load_and_warm(state), name="imagegen-load-models")
        upkeep = asyncio.create_task(_maintain(state), name="imagegen-maintain")
        try:
            yield
        finally:
            readiness.draining = True
            loading.cancel()
            upkeep.cancel()
            await asyncio.gather(loading, upkeep, return_exceptions=True)
            await state.jobs.aclose()
            if state.owns_service:
                await state.service.aclose()

    app = FastAPI(
        title="imagegen",
        summary="OpenAI-compatible image generation on local GPUs and hosted APIs.",
        lifespan=lifespan,
    )
    app.state.imagegen = state
    http_errors.install(app)
    for module in (
        routes_images,
        routes_jobs,
        routes_batches,
        routes_models,
        routes_loras,
        routes_ops,
        # At the root, never under a prefix: SillyTavern replaces any path it is given.
        a1111,
    ):
        app.include_router(module.router)
    # Added last = runs first: the request id (every response, a 401 included, carries it),
    # then the key check, then the body limit (no one streams a body here without a key).
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(settings.server.max_body_mb * 1024**2))
    app.add_middleware(
        AuthMiddleware,
        keys=ApiKeys(settings.server.api_keys),
        failures_per_minute=settings.server.auth_failures_per_minute,
    )
    app.add_middleware(RequestContextMiddleware)
    if settings.server.cors_origins:
        # Before the key check: a browser's preflight (OPTIONS) never carries the key. Off
        # unless origins are listed: no CORS headers at all means other origins cannot read.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.cors_origins,
            allow_credentials=settings.server.cors_allow_credentials,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Request-Timeout"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    # Outermost: every response, a preflight or a 401 included, carries the headers.
    app.add_middleware(SecurityHeadersMiddleware)
    return app


async def _maintain(state: AppState) -> None:
    """The service's housekeeping at start and every MAINTAIN_S after (server.service
    ImageService.maintain); a failure is logged and tried again next time."""
    while True:
        try:
            removed = await asyncio.to_thread(state.service.maintain)
            if removed:
                log.info("removed %d unreferenced cache object(s)", removed)
        except Exception:
            log.exception("store housekeeping failed; it runs again in %d s", MAINTAIN_S)
        await asyncio.sleep(MAINTAIN_S)


async def _load_and_warm(state: AppState) -> None:
    """Load every named model and run one tiny generation on each local one, so the first
    real request pays for neither (weights, kernels, allocator)."""
    readiness = state.readiness
    try:
        for name in readiness.models:
            started = time.perf_counter()
            await state.service.load([name])
            backend = state.service.backend(name)
            if backend.is_local:
                await _warm_up(backend)
            log.info("model %s ready in %.1f s", name, time.perf_counter() - started)
    except errors.ImagegenError as exc:
        readiness.load_error = exc.message
    except Exception:
        # Not an error written for clients: its text stays in the log (/readyz is public).
        log.exception("loading models failed")
        readiness.load_error = "an internal error (see the server log)"
    else:
        readiness.ready = True
        state.metrics.ready.set(1)
        return
    log.error("cannot serve: %s", readiness.load_error)
    if state.on_load_failed is not None:
        state.on_load_failed(readiness.load_error)


async def _warm_up(backend: base.Backend) -> None:
    spec = backend.spec
    params = backend.resolve(
        base.GenerationParams(
            prompt="warm-up",
            model=spec.name,
            width=spec.defaults.width,
            height=spec.defaults.height,
            n=1,
            seed=0,
            steps=1,
        )
    )
    await backend.generate(params)
