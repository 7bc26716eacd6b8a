"""The ImageService: the one production path every caller (CLI, HTTP, batch) goes through —
preset, sanitizer, seed, cache, router, backend, quality check, cost and ledger. Callers use
its public methods only; what it is made of (cache, ledger, registry) is its own business.

Work that is not the event loop's — tokenizer loading and first-use weight hashing while a
request is resolved, the quality check, PNG metadata, the cache write and the ledger row after
generation, decoding input images — runs in a thread, so one slow disk or a first request
never stalls other clients. The one exception is measured: a text-only request for a warm model
resolves and looks up the cache on the loop (`_light`), because the thread hop cost more than
the lookups (a cache hit in-process: 0.39 ms with the hop, 0.22 ms without). The price: a hit's
file read and digest check run on the loop (a 64x64 PNG: microseconds; a 1024x1024 one: about
1-2 ms, measured).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from models import base
from models.base import NO_EVENTS, Backend, BackendResult, Events, GenerationParams, ModelSpec
from models.catalogue import Catalogue
from models.local import sources
from models.local.loras import LoraLibrary
from server import aliases, errors
from server.attempt import Attempt, PreparedRequest, Resolver
from server.cache import ResultCache, cache_key
from server.cost import Costs, Estimate
from server.flight import SharedFlight, SingleFlight
from server.ledger import Ledger, LedgerRow
from server.presets import PresetBook
from server.quality import QualityReport
from server.quotas import Hold, Quotas
from server.registry import BackendRegistry, WorkerObserver
from server.request import MAX_N, MAX_SEED, ImageRequest, expand, names_loras
from server.result import (
    GenerationResult,
    ResultImage,
    cached_images,
    check,
    result_images,
    with_metadata,
)
from server.router import Admission, Candidate, Router
from server.sanitizer import Sanitizer
from server.settings import ConfigFileError, Settings
from server.store import open_store
from server.store.claims import Claim, Claims
from server.store.sql import Tx

__all__ = [
    "MAX_N",
    "MAX_SEED",
    "GenerationResult",
    "ImageRequest",
    "ImageService",
    "PreparedRequest",
    "ResultImage",
]

log = logging.getLogger(__name__)


class ImageService:
    def __init__(self, settings: Settings, *, registry: BackendRegistry | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.catalogue = Catalogue.load(settings.models)
        self.presets = PresetBook.load(settings.presets)
        self.sanitizer = Sanitizer.default()
        try:
            self.store = open_store(settings)
        except ValueError as exc:
            raise ConfigFileError(str(exc)) from None
        self.db = self.store.db
        self.cache = ResultCache(self.store.blobs, self.db, max_bytes=settings.cache_max_bytes)
        self.ledger = Ledger(self.db)
        self.costs = Costs(settings.cost, self.ledger)
        self.registry = registry or BackendRegistry(settings, self.catalogue)
        self.router = Router(settings, self.catalogue, self.ledger)
        self.quotas = Quotas(self.ledger)
        self.flights = SingleFlight()
        self.claims = Claims(self.db, lease_s=settings.store.claim_lease_s)
        self.shared_flights = SharedFlight(self.claims)
        self.lora_library = LoraLibrary(
            settings.lora_dir, memo_dir=sources.digest_memo_dir(settings.data_dir)
        )
        self._resolver = Resolver()

    # -- the production path -------------------------------------------------------------

    async def generate(
        self, request: ImageRequest, *, events: Events = NO_EVENTS
    ) -> GenerationResult:
        """Run `request` on the first model of its route that can serve it: the requested
        model, then its fallbacks on a transient failure, an open circuit, a full queue or a
        spent budget."""
        started = time.perf_counter()
        request_id = request.request_id or "img_" + uuid.uuid4().hex[:24]
        # Everything before the backend on the first model of the route (a cache hit is served
        # without more) takes one thread hop, unless it is only lookups: see `_light`.
        if self._light(request):
            params, chain, first = self._begin(request, request_id, started)
        else:
            params, chain, first = await asyncio.to_thread(
                self._begin, request, request_id, started
            )
        skipped: list[tuple[str, str]] = []
        last_error: errors.ImagegenError | None = None
        for index, candidate in enumerate(chain):
            try:
                if index == 0:
                    if isinstance(first, errors.ServiceError):
                        raise first
                    attempt, hit = first
                else:
                    attempt, hit = await asyncio.to_thread(
                        self._looked_up, candidate, params, request, request_id, started
                    )
                result = hit if hit is not None else await self._run_once(attempt, events)
            except errors.ServiceError as exc:
                if not _next_model_may_serve(index, exc, chosen=params.model == "auto"):
                    raise
                skipped.append((candidate.spec.name, exc.message))
                last_error = exc
                events.fallback(candidate.spec.name, exc.message)
                continue
            notices = [candidate.notice] if candidate.notice else []
            notices += [f"not served by {name}: {reason}" for name, reason in skipped]
            if notices:
                result = dataclasses.replace(
                    result,
                    notices=(*result.notices, *notices),
                    fallback_from=tuple(name for name, _ in skipped),
                )
            return result
        assert last_error is not None  # the plan is never empty
        raise last_error

    def prepare(self, request: ImageRequest) -> PreparedRequest:
        """Everything `generate` does before it runs a backend (validation, preset, sanitizer,
        route, per-model defaults, cache key), for callers that must price or check a request
        first. Raises the same errors `generate` would; prices the first model of the route.
        Blocking (it may load a tokenizer): call it off the event loop."""
        params, chain = self._route(request)
        attempt = self._attempt_for(chain[0], params, request, "", time.perf_counter())
        cached = request.seed is not None and self.cache.get(attempt.key) is not None
        estimate = (
            Estimate(0.0, "served from the cache")
            if cached
            else self.costs.estimate(attempt.backend, attempt.params)
        )
        return PreparedRequest(
            params=attempt.params,
            backend=attempt.backend,
            revised_prompt=params.prompt,
            cache_key=attempt.key,
            cached=cached,
            estimate=estimate,
        )

    async def admit(self, request: ImageRequest) -> None:
        """Raise now what `generate` would refuse `request` for before running a backend: bad
        fields, an unknown model, a blocked prompt, and — where no model of the route could
        take it now — a spent budget, an open circuit or a full queue."""
        await asyncio.to_thread(self._admit, request)

    def _admit(self, request: ImageRequest) -> None:
        params, chain = self._route(request)
        last: errors.ServiceError | None = None
        for index, candidate in enumerate(chain):
            try:
                attempt = self._attempt_for(candidate, params, request, "", time.perf_counter())
                if request.seed is not None and self.cache.get(attempt.key) is not None:
                    return
                # A look, not the attempt: a half-open probe is left for the real one, and
                # the caller's quota is not held.
                self._admission(attempt).abandoned()
                self.quotas.release(self._hold(attempt))
                with errors.mapped():
                    attempt.backend.admit(attempt.params)
                return
            except errors.ServiceError as exc:
                if not _next_model_may_serve(index, exc, chosen=params.model == "auto"):
                    raise
                last = exc
        assert last is not None
        raise last

    # -- the steps -----------------------------------------------------------------------

    def _light(self, request: ImageRequest) -> bool:
        """Whether `_begin` may run on the event loop: a text-only request for a model that
        is warm is a few dictionary lookups, one small SQLite query (and on a hit, a small
        file read and one ledger row), cheaper than the thread hop (~0.17 ms) it would take.
        Image inputs (decoding), adapters (a file's first hash), presets (which may name
        adapters), `auto`, a model's first use and a database across the network keep the
        hop."""
        if request.images or request.mask is not None or request.loras or request.preset:
            return False
        if not self.db.in_process:
            return False  # its lookups are round trips to a database server: not on the loop
        if names_loras(request.prompt):
            return False
        model = request.model or self.settings.default_model
        alias = self.router.alias(model)
        return self._resolver.warm(alias.target if alias is not None else model)

    def _begin(
        self, request: ImageRequest, request_id: str, started: float
    ) -> tuple[
        GenerationParams,
        list[Candidate],
        tuple[Attempt, GenerationResult | None] | errors.ServiceError,
    ]:
        """Route the request and look up its first model's attempt (and cache entry). An error
        of that attempt is returned, not raised: the caller decides whether a fallback runs."""
        params, chain = self._route(request)
        try:
            first = self._looked_up(chain[0], params, request, request_id, started)
        except errors.ServiceError as exc:
            return params, chain, exc
        return params, chain, first

    def _looked_up(
        self,
        candidate: Candidate,
        params: GenerationParams,
        request: ImageRequest,
        request_id: str,
        started: float,
    ) -> tuple[Attempt, GenerationResult | None]:
        """The attempt for `candidate`, and its cached result when the request has a seed."""
        attempt = self._attempt_for(candidate, params, request, request_id, started)
        hit = self._from_cache(attempt) if request.seed is not None else None
        return attempt, hit

    def _route(self, request: ImageRequest) -> tuple[GenerationParams, list[Candidate]]:
        """The checked, expanded request and the models that may serve it, in order."""
        params = expand(
            request,
            presets=self.presets,
            sanitizer=self.sanitizer,
            catalogue=self.catalogue,
            default_model=self.settings.default_model,
            find_lora=self._find_lora,
            max_input_megapixels=self.settings.server.max_input_megapixels,
        )
        chain = self.router.plan(
            params.model,
            local_only=self.router.local_only(request.local_only),
            estimate=lambda spec: self._estimate(spec, params),
        )
        return params, chain

    def _find_lora(self, name: str) -> base.LoraRef:
        """The library's file of that name (its hash keys the cache); whether it fits the
        model is the backend's check, in resolve."""
        with errors.mapped():
            found = self.lora_library.find(name)
        return base.LoraRef(name=found.name, weight=0.0, sha256=found.sha256)

    def _estimate(self, spec: ModelSpec, params: GenerationParams) -> float | None:
        backend = self.registry.backend_for(spec.name)
        return self.costs.estimate(backend, dataclasses.replace(params, model=spec.name)).usd

    def _attempt_for(
        self,
        candidate: Candidate,
        params: GenerationParams,
        request: ImageRequest,
        request_id: str,
        started: float,
    ) -> Attempt:
        """The request as one model of the route sees it: that model's size defaults, steps,
        guidance and scheduler, its prompt limit, and the cache key of the result."""
        spec = candidate.spec
        backend = self.registry.backend_for(spec.name)
        # An input image sets the size (unless "masked" mode works at the model's size).
        masked = params.inpaint_area == "masked" and params.mask is not None
        sized = bool(request.width) or (bool(params.images) and not masked)
        params = dataclasses.replace(
            params,
            model=spec.name,
            width=params.width if sized else spec.defaults.width,
            height=params.height if sized else spec.defaults.height,
        )
        unsupported = backend.unsupported(params)
        if unsupported is not None:
            raise errors.InvalidRequestError(
                unsupported,
                param="loras" if params.loras and not params.images else "model",
            )
        with errors.mapped():
            params, identity = self._resolver.resolve(backend, params)
        return Attempt(
            request_id=request_id,
            request=request,
            candidate=candidate,
            backend=backend,
            params=params,
            key=cache_key(params.pixel_fields(), identity),
            identity=identity,
            started=started,
            timings={"prepare_ms": _ms(started)},
        )

    async def _run_once(self, attempt: Attempt, events: Events) -> GenerationResult:
        """`_run`, or for a seeded request its backend reproduces, a wait for the identical
        request already running (in this process, or any other sharing the store) and its
        result from the cache (server.flight)."""
        if attempt.request.seed is None or not attempt.backend.reproducible(attempt.params):
            return await self._run(attempt, events)

        def follow() -> Awaitable[GenerationResult | None]:
            return asyncio.to_thread(self._from_cache, attempt)

        def lead_here() -> Awaitable[GenerationResult]:
            return self.shared_flights.run(
                attempt.key, lambda claim: self._run(attempt, events, claim=claim), follow
            )

        return await self.flights.run(attempt.key, lead_here, follow)

    async def _run(
        self, attempt: Attempt, events: Events, *, claim: Claim | None = None
    ) -> GenerationResult:
        """Run `attempt` on its backend (its cache lookup already missed), publishing under
        `claim` where it holds one."""
        attempt.claim = claim
        backend, params = attempt.backend, attempt.params
        attempt.held = self._hold(attempt)
        try:
            admission = self._admission(attempt)
        except BaseException:
            self.quotas.release(attempt.held)
            raise
        try:
            result = await self._call(attempt, events, precise=False)
            finished = await asyncio.to_thread(self._finish, attempt, result)
            if isinstance(finished, list):
                retryable = [r for r in finished if not r.ok and r.retryable]
                if retryable:
                    # One retry in the numerically safe mode where a known fix exists (NaN or
                    # all-black frames: the fp16 VAE overflow).
                    events.retry(retryable[0].reason or "quality check")
                    second = await self._call(attempt, events, precise=True)
                    result = dataclasses.replace(
                        second, gpu_seconds=second.gpu_seconds + result.gpu_seconds
                    )
                    finished = await asyncio.to_thread(self._finish, attempt, result)
            if isinstance(finished, list):
                reason = next(r.reason for r in finished if not r.ok) or "quality check failed"
                await asyncio.to_thread(
                    self._book,
                    attempt,
                    self._row(
                        attempt,
                        provider=result.provider,
                        seeds=[img.seed for img in result.images],
                        cost_usd=self.costs.charged(result, backend, params),
                        gpu_seconds=result.gpu_seconds,
                        status="failed",
                        error=reason,
                    ),
                )
                raise errors.GenerationFailedError(
                    f"the generated image failed the quality check: {reason}"
                )
        except errors.ImagegenError as exc:
            admission.failed(exc)
            raise
        except BaseException:
            admission.abandoned()  # cancelled: the attempt told nothing about the provider
            raise
        finally:
            self.quotas.release(attempt.held)
        admission.succeeded()
        return finished

    def _hold(self, attempt: Attempt) -> Hold | None:
        """The caller's daily quotas, held for this attempt's images and estimated cost."""
        backend, params = attempt.backend, attempt.params
        return self.quotas.hold(
            attempt.request.caller, params.n, lambda: self.costs.reserve(backend, params)
        )

    def _admission(self, attempt: Attempt) -> Admission:
        """Budgets and the circuit breaker, in one step (the budget reserves this attempt's
        estimate, or a conservative bound where there is none)."""
        return self.router.admit(
            attempt.provider, lambda: self.costs.reserve(attempt.backend, attempt.params)
        )

    async def _call(self, attempt: Attempt, events: Events, *, precise: bool) -> BackendResult:
        """The backend call. Whatever a provider billed before failing (a charged moderation,
        the images of an n>1 request already paid for) is booked under the request's id."""
        generating = time.perf_counter()
        try:
            result = await attempt.backend.generate(attempt.params, events, precise=precise)
            attempt.timings["generate_ms"] = _ms(generating)
            return result
        except base.BackendError as exc:
            if exc.charged_usd > 0:
                await asyncio.to_thread(
                    self._book,
                    attempt,
                    self._row(
                        attempt,
                        provider=exc.provider or attempt.provider,
                        seeds=[],
                        cost_usd=exc.charged_usd,
                        gpu_seconds=0.0,
                        status="filtered"
                        if isinstance(exc, base.ContentFilteredError)
                        else "failed",
                        error=exc.message,
                    ),
                )
            raise errors.from_backend(exc, attempt.request_id) from None

    def _finish(
        self, attempt: Attempt, result: BackendResult
    ) -> GenerationResult | list[QualityReport]:
        """Check every image; if all pass, embed the parameters, cache, book and build the
        result. Otherwise the quality reports, for the caller to retry or refuse. Blocking."""
        params = attempt.params
        exact = attempt.backend.is_local
        reports: list[QualityReport] = [
            check(img, params, exact_size=exact) for img in result.images
        ]
        if not all(r.ok for r in reports):
            return reports
        images = with_metadata(result.images, params, attempt.identity, result.provider)
        cost = self.costs.charged(result, attempt.backend, params)
        dropped = tuple(sorted({*result.dropped_params, *attempt.request.dropped_by_service()}))
        # The provider's own rewrite of the prompt where it reports one (OpenAI, a remote
        # imagegen); otherwise the prompt as expanded by the preset.
        revised = result.revised_prompt or params.prompt
        row = self._row(
            attempt,
            provider=result.provider,
            seeds=[img.seed for img in images],
            cost_usd=cost,
            gpu_seconds=result.gpu_seconds,
        )
        claim = attempt.claim
        stored = (
            self.cache.write_objects(
                [(img.data, img.seed, img.width, img.height, img.format) for img in images]
            )
            if result.deterministic
            else None
        )

        def publish(tx: Tx) -> None:
            # Under a claim: only its current holder books and publishes (FencedError
            # otherwise), and the row's unique claim id makes a second bill unwritable.
            if claim is not None:
                self.claims.fence(tx, claim)
                row_of_claim = dataclasses.replace(row, claim=claim.billing_id)
                self.ledger.record(row_of_claim, tx)
                self.claims.release(claim, tx)
            else:
                self.ledger.record(row, tx)

        with self.quotas.booking(attempt.held):
            if stored is None:
                with self.db.transaction() as tx:
                    publish(tx)
            else:
                meta = {
                    "model": params.model,
                    "provider": result.provider,
                    "revised_prompt": revised,
                    "negative_prompt": params.negative_prompt,
                    "cost_usd": cost,
                    "gpu_seconds": result.gpu_seconds,
                    "dropped_params": list(dropped),
                    "quality": [r.as_dict() for r in reports],
                }
                self.cache.publish(attempt.key, stored, meta, also=publish)
        attempt.timings["total_ms"] = _ms(attempt.started)
        return GenerationResult(
            request_id=attempt.request_id,
            model=params.model,
            provider=result.provider,
            cached=False,
            images=result_images(images, reports),
            revised_prompt=revised,
            negative_prompt=params.negative_prompt,
            params=params,
            cost_usd=cost,
            gpu_seconds=result.gpu_seconds,
            dropped_params=dropped,
            notices=result.notices,
            timings=attempt.timings,
            cache_key=attempt.key,
        )

    def _from_cache(self, attempt: Attempt) -> GenerationResult | None:
        entry = self.cache.get(attempt.key)
        if entry is None:
            return None
        meta = entry.meta
        saved = float(meta.get("cost_usd", 0.0))
        provider = str(meta.get("provider", "local"))
        row = self._row(
            attempt,
            provider=provider,
            seeds=[img.seed for img in entry.images],
            cost_usd=0.0,
            gpu_seconds=0.0,
            cached=True,
            saved_usd=saved,
        )
        self._book(attempt, row)
        params = attempt.params
        attempt.timings["total_ms"] = _ms(attempt.started)
        return GenerationResult(
            request_id=attempt.request_id,
            model=params.model,
            provider=provider,
            cached=True,
            images=cached_images(entry),
            revised_prompt=str(meta.get("revised_prompt") or params.prompt),
            negative_prompt=params.negative_prompt,
            params=params,
            cost_usd=0.0,
            gpu_seconds=0.0,
            saved_usd=saved,
            dropped_params=tuple(meta.get("dropped_params", ())),
            timings=attempt.timings,
            cache_key=attempt.key,
        )

    def _book(self, attempt: Attempt, row: LedgerRow) -> None:
        """Write a ledger row: the caller's quota counts it from now on, in place of what the
        attempt held."""
        with self.quotas.booking(attempt.held):
            self.ledger.record(row)

    @staticmethod
    def _row(
        attempt: Attempt,
        *,
        provider: str,
        seeds: list[int | None],
        cost_usd: float,
        gpu_seconds: float,
        cached: bool = False,
        saved_usd: float = 0.0,
        status: str = "ok",
        error: str | None = None,
    ) -> LedgerRow:
        """The one place ledger rows are made: every row carries the request's id and its
        caller."""
        return LedgerRow(
            request_id=attempt.request_id,
            model=attempt.params.model,
            provider=provider,
            cached=cached,
            seeds=seeds,
            cost_usd=cost_usd,
            gpu_seconds=gpu_seconds,
            saved_usd=saved_usd,
            status=status,
            error=error,
            tag=attempt.request.tag,
            caller=attempt.request.caller.id,
        )

    # -- the rest of the service ---------------------------------------------------------

    async def load(self, models: list[str]) -> None:
        for name in models:
            backend = self.backend(name)
            with errors.mapped():
                await backend.load()

    def backend(self, name: str) -> Backend:
        """The backend of a catalogue model (ModelNotFoundError for an unknown name)."""
        return self.registry.backend_for(name)

    def watch_device(self, observer: WorkerObserver) -> None:
        """Report device batches and queue depth to `observer` (the server's metrics)."""
        self.registry.watch(observer)

    def on_device_fault(self, listener: Callable[[str], None]) -> None:
        """Call `listener(message)`, from the device's thread, when the device fails for good
        (`imagegen serve` exits so that a supervisor restarts the process)."""
        self.registry.on_device_fault(listener)

    def device_fault(self) -> str | None:
        """Why the local device can no longer work (a sticky CUDA fault), or None."""
        return self.registry.device_fault()

    def spent(self, tag: str) -> float:
        """USD booked so far under `tag` (a batch run)."""
        return self.ledger.spent(tag)

    @property
    def usd_per_gpu_hour(self) -> float:
        return self.costs.usd_per_gpu_hour

    def knows_model(self, name: str) -> bool:
        return self.catalogue.get(name) is not None or self.router.alias(name) is not None

    def read_file(self, sha256: str) -> tuple[bytes, str] | None:
        """A generated image by its content hash, while the cache holds it."""
        return self.cache.read_object(sha256)

    def keep_for_download(self, result: GenerationResult) -> None:
        """Keep `result`'s images where `read_file` finds them: results the cache did not keep
        (a provider that ignores seeds) are stored under an entry of their own, evicted like
        any other."""
        cache = self.cache
        missing = [img for img in result.images if not cache.has_object(img.sha256, img.format)]
        if missing:
            cache.put(
                "files:" + result.request_id,
                [(img.data, img.seed, img.width, img.height, img.format) for img in missing],
                {"model": result.model, "provider": result.provider, "files_only": True},
            )

    def models(self) -> list[dict[str, Any]]:
        return aliases.listing(self.registry.describe(), self.router.active_aliases())

    def model_revision(self, name: str) -> str | None:
        """What identifies catalogue model `name`'s weights (Backend.weights_revision): None
        for hosted models and weights not on disk. Blocking (the first look at a local model
        may hash its files): call it off the event loop."""
        spec = self.catalogue.get(name)
        if spec is None or not spec.is_local:
            return None
        return self.backend(name).weights_revision()

    def loras(self) -> list[dict[str, Any]]:
        """The LoRA library (local.lora_dir): each adapter's name, the family it fits (None
        where its header does not say), format, file sha256 and size. Blocking (the first
        listing of a file hashes it): call it off the event loop."""
        return [
            {
                "name": lora.name,
                "family": lora.family,
                "format": lora.format,
                "sha256": lora.sha256,
                "size_bytes": lora.size_bytes,
            }
            for lora in self.lora_library.list()
        ]

    def maintain(self) -> int:
        """Housekeeping that one replica at a time does (the store's locks decide which):
        image objects no cache entry names, left by a process killed mid-publish. Returns
        how many were removed. Blocking."""
        return self.cache.sweep()

    def stats(self) -> dict[str, Any]:
        return {
            **self.ledger.stats(),
            "cache": self.cache.stats(),
            "usd_per_gpu_hour": self.costs.usd_per_gpu_hour,
            "devices": self.devices(),
        }

    def devices(self) -> list[dict[str, Any]]:
        """Each device's memory budget and use (models.local.residency)."""
        return self.registry.devices()

    async def aclose(self) -> None:
        await self.registry.aclose()
        self.db.close()

    def close(self) -> None:
        asyncio.run(self.aclose())


def _next_model_may_serve(index: int, exc: errors.ServiceError, *, chosen: bool) -> bool:
    """Whether the route goes on to its next model after the one at `index` failed with
    `exc`: on a transient failure or a spent budget; and a model the server chose (a fallback,
    or any model of `auto`) that cannot take these parameters (another size grid, a shorter
    prompt limit, no image inputs) is passed over, while the model asked for reports its own
    bad-input errors."""
    unfit = (index > 0 or chosen) and type(exc) is errors.InvalidRequestError
    return exc.transient or unfit or isinstance(exc, errors.BudgetExhaustedError)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)
