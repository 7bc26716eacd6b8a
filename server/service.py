"""The ImageService: the one production path every caller (CLI, HTTP, batch) goes through —
preset, sanitizer, seed, cache, router, backend, quality check, cost and ledger."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models import base
from models.base import (
    NO_EVENTS,
    Backend,
    BackendResult,
    Events,
    GeneratedImage,
    GenerationParams,
    ModelSpec,
)
from models.catalogue import Catalogue
from server import errors, pngmeta
from server.cache import ResultCache, cache_key
from server.cost import Costs, Estimate
from server.db import Database
from server.ledger import Ledger, LedgerRow
from server.presets import PresetBook, PresetError
from server.quality import QualityReport, check_image, check_pixels
from server.registry import BackendRegistry
from server.router import Candidate, Router
from server.sanitizer import Sanitizer
from server.settings import Settings

log = logging.getLogger(__name__)

MAX_N = 10
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class ImageRequest:
    """A request as callers make it, before presets, defaults and seeds are applied."""

    prompt: str
    model: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    quality: str | None = None
    style: str | None = None
    preset: str | None = None
    output_format: base.OutputFormat = "png"
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    user: str | None = None
    # Data residency for this request: never leave the host, whatever the server allows.
    local_only: bool = False
    # Groups ledger rows (a batch run id).
    tag: str | None = None
    # The caller's id for this request (the HTTP layer's X-Request-Id); generated when None.
    request_id: str | None = None


@dataclass(frozen=True)
class ResultImage:
    data: bytes
    sha256: str
    seed: int | None
    width: int
    height: int
    format: str
    quality: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    model: str
    provider: str
    cached: bool
    images: tuple[ResultImage, ...]
    revised_prompt: str
    negative_prompt: str | None
    params: GenerationParams
    cost_usd: float
    gpu_seconds: float
    saved_usd: float = 0.0
    dropped_params: tuple[str, ...] = ()
    notices: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    cache_key: str = ""
    # Models of the route that could not serve it before the one that did.
    fallback_from: tuple[str, ...] = ()

    @property
    def seeds(self) -> list[int | None]:
        return [img.seed for img in self.images]


@dataclass(frozen=True)
class _Attempt:
    spec: ModelSpec
    backend: Backend
    params: GenerationParams
    key: str
    identity: dict[str, Any]


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


class ImageService:
    def __init__(self, settings: Settings, *, registry: BackendRegistry | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.catalogue = Catalogue.load(settings.models)
        self.presets = PresetBook.load(settings.presets)
        self.sanitizer = Sanitizer.default()
        self.db = Database(settings.db_path)
        self.cache = ResultCache(settings.cache_dir, self.db, max_bytes=settings.cache_max_bytes)
        self.ledger = Ledger(self.db)
        self.costs = Costs(settings.cost, self.ledger)
        self.registry = registry or BackendRegistry(settings, self.catalogue)
        self.router = Router(settings, self.catalogue, self.ledger)

    # -- the production path -------------------------------------------------------------

    async def generate(
        self, request: ImageRequest, *, events: Events = NO_EVENTS
    ) -> GenerationResult:
        """Run `request` on the first model of its route that can serve it: the requested
        model, then its fallbacks on a transient failure, an open circuit or a spent budget."""
        started = time.perf_counter()
        request_id = request.request_id or "img_" + uuid.uuid4().hex[:24]
        base_params, revised, chain = self._route(request)
        skipped: list[tuple[str, str]] = []
        last_error: errors.ImagegenError | None = None
        for index, candidate in enumerate(chain):
            try:
                result = await self._attempt(
                    self._resolve_for(candidate.spec, base_params, request),
                    request,
                    request_id,
                    revised,
                    events,
                    started,
                )
            except errors.ImagegenError as exc:
                # A fallback that cannot take these parameters (another size grid, a shorter
                # prompt limit) is passed over; the model asked for reports its own errors.
                unfit = index > 0 and type(exc) is errors.InvalidRequestError
                if not (exc.transient or unfit or isinstance(exc, errors.BudgetExhaustedError)):
                    raise
                skipped.append((candidate.spec.name, exc.message))
                last_error = exc
                events.fallback(candidate.spec.name, exc.message)
                continue
            if skipped:
                result = dataclasses.replace(
                    result,
                    notices=(
                        *result.notices,
                        *(f"not served by {name}: {reason}" for name, reason in skipped),
                    ),
                    fallback_from=tuple(name for name, _ in skipped),
                )
            return result
        assert last_error is not None  # the plan is never empty
        raise last_error

    def prepare(self, request: ImageRequest) -> PreparedRequest:
        """Everything `generate` does before it runs a backend (validation, preset, sanitizer,
        route, per-model defaults, cache key), for callers that must price or check a request
        first. Raises the same errors `generate` would; prices the first model of the route."""
        base_params, revised, chain = self._route(request)
        attempt = self._resolve_for(chain[0].spec, base_params, request)
        cached = request.seed is not None and self.cache.get(attempt.key) is not None
        estimate = (
            Estimate(0.0, "served from the cache")
            if cached
            else self.costs.estimate(attempt.backend, attempt.params)
        )
        return PreparedRequest(
            params=attempt.params,
            backend=attempt.backend,
            revised_prompt=revised,
            cache_key=attempt.key,
            cached=cached,
            estimate=estimate,
        )

    def _route(self, request: ImageRequest) -> tuple[GenerationParams, str, list[Candidate]]:
        """The checked, expanded request and the models that may serve it, in order."""
        base_params, revised = self._prepare(request)
        chain = self.router.plan(
            base_params.model,
            local_only=self._local_only(request),
            estimate=lambda spec: self._estimate(spec, base_params),
        )
        return base_params, revised, chain

    def _resolve_for(
        self, spec: ModelSpec, base_params: GenerationParams, request: ImageRequest
    ) -> _Attempt:
        """The request as one model of the route sees it: that model's size defaults, steps,
        guidance and scheduler, its prompt limit, and the cache key of the result."""
        backend = self.registry.backend_for(spec.name)
        params = dataclasses.replace(
            base_params,
            model=spec.name,
            width=request.width or spec.defaults.width,
            height=request.height or spec.defaults.height,
        )
        try:
            params = backend.resolve(params)
            backend.check_prompt(params.prompt)
        except base.BackendError as exc:
            raise _map_backend_error(exc) from None
        identity = self._identity(backend, params)
        key = cache_key(params.pixel_fields(), identity)
        return _Attempt(spec=spec, backend=backend, params=params, key=key, identity=identity)

    async def _attempt(
        self,
        attempt: _Attempt,
        request: ImageRequest,
        request_id: str,
        revised: str,
        events: Events,
        started: float,
    ) -> GenerationResult:
        backend, params, key = attempt.backend, attempt.params, attempt.key
        timings: dict[str, float] = {"prepare_ms": _ms(started)}
        if request.seed is not None:
            hit = self._from_cache(key, request_id, params, revised, request, timings, started)
            if hit is not None:
                return hit
        provider = self.router.provider_of(attempt.spec)
        if self.router.has_budget(provider):
            self.router.check_budget(provider, self.costs.reserve(backend, params))
        breaker = self.router.breaker(provider)
        if not breaker.allow():
            raise errors.ProviderError(
                f"{provider} is failing repeatedly (circuit open); it is probed again shortly",
                transient=True,
            )
        gen_start = time.perf_counter()
        try:
            result, reports = await self._run_checked(backend, params, events, tag=request.tag)
        except errors.ImagegenError as exc:
            if exc.transient:
                breaker.failure()
            else:
                # The provider answered (a refusal or bad input is not an outage).
                breaker.success()
            raise
        except BaseException:
            breaker.probing = False  # cancelled: the probe did not happen
            raise
        breaker.success()
        timings["generate_ms"] = _ms(gen_start)
        dropped = tuple(sorted({*result.dropped_params, *_dropped_by_service(request)}))

        images = self._finish_images(result, params, attempt.identity, revised)
        cost = self.costs.charged(result, backend, params)
        if result.deterministic:
            self.cache.put(
                key,
                [(img.data, img.seed, img.width, img.height, img.format) for img in images],
                {
                    "model": params.model,
                    "provider": result.provider,
                    "revised_prompt": revised,
                    "negative_prompt": params.negative_prompt,
                    "cost_usd": cost,
                    "gpu_seconds": result.gpu_seconds,
                    "dropped_params": list(dropped),
                    "quality": [r.as_dict() for r in reports],
                },
            )
        self.ledger.record(
            LedgerRow(
                request_id=request_id,
                model=params.model,
                provider=result.provider,
                cached=False,
                seeds=[img.seed for img in images],
                cost_usd=cost,
                gpu_seconds=result.gpu_seconds,
                tag=request.tag,
            )
        )
        timings["total_ms"] = _ms(started)
        return GenerationResult(
            request_id=request_id,
            model=params.model,
            provider=result.provider,
            cached=False,
            images=tuple(
                ResultImage(
                    data=img.data,
                    sha256=hashlib.sha256(img.data).hexdigest(),
                    seed=img.seed,
                    width=img.width,
                    height=img.height,
                    format=img.format,
                    quality=rep.as_dict(),
                )
                for img, rep in zip(images, reports, strict=True)
            ),
            revised_prompt=revised,
            negative_prompt=params.negative_prompt,
            params=params,
            cost_usd=cost,
            gpu_seconds=result.gpu_seconds,
            dropped_params=dropped,
            notices=result.notices,
            timings=timings,
            cache_key=key,
        )

    def _estimate(self, spec: ModelSpec, params: GenerationParams) -> float | None:
        backend = self.registry.backend_for(spec.name)
        return self.costs.estimate(backend, dataclasses.replace(params, model=spec.name)).usd

    def _prepare(self, request: ImageRequest) -> tuple[GenerationParams, str]:
        """Validate, expand the preset and check the prompt: everything that must fail before
        any model loads."""
        if not request.prompt or not request.prompt.strip():
            raise errors.InvalidRequestError("prompt must be a non-empty string", param="prompt")
        if not 1 <= request.n <= MAX_N:
            raise errors.InvalidRequestError(
                f"n must be between 1 and {MAX_N}, got {request.n}", param="n"
            )
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED - MAX_N:
            raise errors.InvalidRequestError(
                f"seed must be between 0 and {MAX_SEED - MAX_N}, got {request.seed}",
                param="seed",
            )
        if request.steps is not None and not 1 <= request.steps <= 200:
            raise errors.InvalidRequestError(
                f"steps must be between 1 and 200, got {request.steps}", param="steps"
            )
        if request.guidance_scale is not None and not 0 <= request.guidance_scale <= 50:
            raise errors.InvalidRequestError(
                f"guidance_scale must be between 0 and 50, got {request.guidance_scale}",
                param="guidance_scale",
            )
        try:
            prompt, negative = self.presets.expand(
                request.preset, request.prompt.strip(), request.negative_prompt
            )
        except PresetError as exc:
            raise errors.InvalidRequestError(str(exc), param="preset") from None
        # Only the positive prompt is screened: negative prompts name what to avoid.
        verdict = self.sanitizer.check(prompt)
        if verdict.blocked:
            raise errors.PromptBlockedError(verdict.category or "policy")
        model = request.model or self.settings.default_model
        # An unknown model is reported by the router, after the prompt is screened.
        spec = self.catalogue.get(model)
        width = request.width or (spec.defaults.width if spec else 1024)
        height = request.height or (spec.defaults.height if spec else 1024)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED - MAX_N)
        params = GenerationParams(
            prompt=prompt,
            model=model,
            width=width,
            height=height,
            n=request.n,
            seed=seed,
            negative_prompt=negative or None,
            steps=request.steps,
            guidance_scale=(
                float(request.guidance_scale) if request.guidance_scale is not None else None
            ),
            scheduler=request.scheduler,
            quality=request.quality,
            style=request.style,
            output_format=request.output_format,
            background=request.background,
            moderation=request.moderation,
            output_compression=request.output_compression,
        )
        return params, prompt

    def _local_only(self, request: ImageRequest) -> bool:
        return self.router.local_only(request.local_only)

    def _identity(self, backend: Backend, params: GenerationParams) -> dict[str, Any]:
        try:
            return backend.identity(params).as_dict()
        except base.BackendError as exc:
            raise _map_backend_error(exc) from None

    def _from_cache(
        self,
        key: str,
        request_id: str,
        params: GenerationParams,
        revised: str,
        request: ImageRequest,
        timings: dict[str, float],
        started: float,
    ) -> GenerationResult | None:
        entry = self.cache.get(key)
        if entry is None:
            return None
        meta = entry.meta
        saved = float(meta.get("cost_usd", 0.0))
        provider = str(meta.get("provider", "local"))
        self.ledger.record(
            LedgerRow(
                request_id=request_id,
                model=params.model,
                provider=provider,
                cached=True,
                seeds=[img.seed for img in entry.images],
                cost_usd=0.0,
                gpu_seconds=0.0,
                saved_usd=saved,
                tag=request.tag,
            )
        )
        quality = list(meta.get("quality") or [{} for _ in entry.images])
        timings["total_ms"] = _ms(started)
        return GenerationResult(
            request_id=request_id,
            model=params.model,
            provider=provider,
            cached=True,
            images=tuple(
                ResultImage(
                    data=img.data,
                    sha256=img.sha256,
                    seed=img.seed,
                    width=img.width,
                    height=img.height,
                    format=img.format,
                    quality=dict(q),
                )
                for img, q in zip(entry.images, quality, strict=False)
            ),
            revised_prompt=revised,
            negative_prompt=params.negative_prompt,
            params=params,
            cost_usd=0.0,
            gpu_seconds=0.0,
            saved_usd=saved,
            dropped_params=tuple(meta.get("dropped_params", ())),
            timings=timings,
            cache_key=key,
        )

    async def _run_checked(
        self, backend: Backend, params: GenerationParams, events: Events, *, tag: str | None = None
    ) -> tuple[BackendResult, list[QualityReport]]:
        """Run the backend and check every image; one retry in the numerically safe mode
        where a known fix exists (NaN / all-black frames: the fp16 VAE overflow)."""
        result = await self._call_backend(backend, params, events, precise=False, tag=tag)
        reports = [self._check(img, params, exact_size=backend.is_local) for img in result.images]
        if all(r.ok for r in reports):
            return result, reports
        if any(r.retryable for r in reports if not r.ok):
            first_gpu = result.gpu_seconds
            events.retry(next(r.reason for r in reports if not r.ok) or "quality check")
            result = await self._call_backend(backend, params, events, precise=True, tag=tag)
            result = dataclasses.replace(result, gpu_seconds=result.gpu_seconds + first_gpu)
            reports = [
                self._check(img, params, exact_size=backend.is_local) for img in result.images
            ]
            if all(r.ok for r in reports):
                return result, reports
        reason = next(r.reason for r in reports if not r.ok) or "quality check failed"
        self.ledger.record(
            LedgerRow(
                request_id="failed_" + uuid.uuid4().hex[:16],
                model=params.model,
                provider=result.provider,
                cached=False,
                seeds=[img.seed for img in result.images],
                cost_usd=self.costs.charged(result, backend, params),
                gpu_seconds=result.gpu_seconds,
                status="failed",
                error=reason,
                tag=tag,
            )
        )
        raise errors.GenerationFailedError(
            f"the generated image failed the quality check: {reason}"
        )

    async def _call_backend(
        self,
        backend: Backend,
        params: GenerationParams,
        events: Events,
        *,
        precise: bool,
        tag: str | None = None,
    ) -> BackendResult:
        try:
            return await backend.generate(params, events, precise=precise)
        except base.ContentFilteredError as exc:
            if exc.charged_usd:
                self.ledger.record(
                    LedgerRow(
                        request_id="filtered_" + uuid.uuid4().hex[:16],
                        model=params.model,
                        provider=exc.provider or backend.provider,
                        cached=False,
                        seeds=[],
                        cost_usd=exc.charged_usd,
                        gpu_seconds=0.0,
                        status="filtered",
                        error=exc.message,
                        tag=tag,
                    )
                )
            raise _map_backend_error(exc) from None
        except base.BackendError as exc:
            raise _map_backend_error(exc) from None

    def _check(
        self, image: GeneratedImage, params: GenerationParams, *, exact_size: bool
    ) -> QualityReport:
        # Local pipelines must produce the requested size; hosted ones may map it (aspect
        # ratios, Midjourney grids), so their images must be the size they declare.
        width, height = (params.width, params.height) if exact_size else (image.width, image.height)
        if image.pixels is not None:
            report = check_pixels(image.pixels, width=width, height=height)
        else:
            report = check_image(image.data, width=width, height=height, format=image.format)
        if "non-finite values" in image.warnings and report.ok:
            return dataclasses.replace(report, ok=False, retryable=True, reason="non-finite values")
        return report

    def _finish_images(
        self,
        result: BackendResult,
        params: GenerationParams,
        identity: Mapping[str, Any],
        revised: str,
    ) -> list[GeneratedImage]:
        """Embed the generation parameters in every PNG so the file reproduces itself."""
        finished = []
        for img in result.images:
            if img.format != "png":
                finished.append(img)
                continue
            seed = img.seed if img.seed is not None else params.seed
            single = dataclasses.replace(params, seed=seed, n=1)
            text = pngmeta.a1111_parameters(
                revised,
                params.negative_prompt,
                steps=params.steps,
                sampler=params.scheduler,
                cfg_scale=params.guidance_scale,
                seed=seed,
                width=img.width,
                height=img.height,
                model=params.model,
                model_hash=str(identity.get("model_revision", ""))[:17] or None,
            )
            record = {
                "request": single.pixel_fields(),
                "seed": seed,
                "model": params.model,
                "provider": result.provider,
                "model_revision": identity.get("model_revision"),
                "backend": identity.get("backend"),
            }
            data = pngmeta.embed(img.data, parameters=text, record=record)
            finished.append(dataclasses.replace(img, data=data))
        return finished

    # -- the rest of the service ---------------------------------------------------------

    async def load(self, models: list[str]) -> None:
        for name in models:
            backend = self.registry.backend_for(name)
            try:
                await backend.load()
            except base.BackendError as exc:
                raise _map_backend_error(exc) from None

    async def admit(self, request: ImageRequest) -> None:
        """Raise now what `generate` would refuse `request` for before running it: bad fields,
        an unknown model, a blocked prompt, a spent budget, a full queue."""
        prepared = await asyncio.to_thread(self.prepare, request)
        if not prepared.cached:
            try:
                prepared.backend.admit(prepared.params)
            except base.BackendError as exc:
                raise _map_backend_error(exc) from None

    def spent(self, tag: str) -> float:
        """USD booked so far under `tag` (a batch run)."""
        return self.ledger.spent(tag)

    @property
    def usd_per_gpu_hour(self) -> float:
        return self.costs.usd_per_gpu_hour

    def knows_model(self, name: str) -> bool:
        return self.catalogue.get(name) is not None

    def read_file(self, sha256: str) -> tuple[bytes, str] | None:
        """A generated image by its content hash, while the cache holds it."""
        return self.cache.read_object(sha256)

    def keep_for_download(self, result: GenerationResult) -> None:
        """Keep `result`'s images where `read_file` finds them: results the cache did not keep
        (a provider that ignores seeds) are stored under an entry of their own, evicted like
        any other."""
        cache = self.cache
        missing = [
            img for img in result.images if not cache.object_path(img.sha256, img.format).is_file()
        ]
        if missing:
            cache.put(
                "files:" + result.request_id,
                [(img.data, img.seed, img.width, img.height, img.format) for img in missing],
                {"model": result.model, "provider": result.provider, "files_only": True},
            )

    def models(self) -> list[dict[str, Any]]:
        return self.registry.describe()

    def stats(self) -> dict[str, Any]:
        return {
            **self.ledger.stats(),
            "cache": self.cache.stats(),
            "usd_per_gpu_hour": self.costs.usd_per_gpu_hour,
        }

    async def aclose(self) -> None:
        await self.registry.aclose()
        self.db.close()

    def close(self) -> None:
        asyncio.run(self.aclose())


def _dropped_by_service(request: ImageRequest) -> tuple[str, ...]:
    return ("user",) if request.user is not None else ()


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


def _map_backend_error(exc: base.BackendError) -> errors.ImagegenError:
    """Backend errors become service errors with the same message (never a stack trace)."""
    if isinstance(exc, base.QueueFullError):
        return errors.QueueFullError(exc.message, retry_after_s=exc.retry_after_s, transient=True)
    if isinstance(exc, base.ContentFilteredError):
        return errors.ContentFilteredError(exc.message, param="prompt")
    if isinstance(exc, base.InvalidParamsError):
        return errors.InvalidRequestError(exc.message, param=exc.param)
    if isinstance(exc, base.ModelUnavailableError):
        return errors.ModelUnavailableError(exc.message, param="model")
    if isinstance(exc, base.AuthError):
        return errors.ProviderAuthError(exc.message)
    if isinstance(exc, base.WorkCancelledError):
        return errors.CancelledError(exc.message)
    if isinstance(exc, base.TransientBackendError):
        return errors.ProviderError(exc.message, transient=True)
    return errors.GenerationFailedError(exc.message)
