"""Hosted backends: OpenAI, Stability AI, Black Forest Labs, midjourney-proxy, remote imagegen.

They implement the same `models.base.Backend` contract as the local diffusers backends, so the
service applies cache, sanitizer, cost and ledger to all alike. Importing this package is cheap:
each backend module (and the `openai` SDK) is imported only when `make_hosted_backend` needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import httpx

from models.base import (
    Backend,
    BackendIdentity,
    GenerationParams,
    InvalidParamsError,
    ModelSpec,
    PromptTooLongError,
)
from models.hosted.config import ProviderConfig, ProviderConfigError
from models.hosted.http import HostedHTTP, SleepFn
from models.prices import PriceTable

__all__ = [
    "HOSTED_KINDS",
    "HostedBackend",
    "ProviderConfig",
    "ProviderConfigError",
    "make_hosted_backend",
]

# kind -> (module, class). Modules load on first use.
_BACKENDS: Mapping[str, tuple[str, str]] = {
    "openai": ("models.hosted.openai_images", "OpenAIImagesBackend"),
    "stability": ("models.hosted.stability", "StabilityBackend"),
    "bfl": ("models.hosted.bfl", "BFLBackend"),
    "midjourney": ("models.hosted.midjourney", "MidjourneyBackend"),
    "imagegen": ("models.hosted.remote", "RemoteImagegenBackend"),
}
HOSTED_KINDS = frozenset(_BACKENDS)


class HostedBackend(Backend):
    """What every hosted backend shares: its provider config, one HTTP client with the common
    retry policy, the price table, the prompt limit from the catalogue, identity."""

    def __init__(
        self,
        spec: ModelSpec,
        config: ProviderConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: SleepFn | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        self.spec = spec
        self.config = config
        self.prices = prices if prices is not None else PriceTable.load()
        self.http = HostedHTTP(config, transport=transport, sleep=sleep)

    @property
    def provider(self) -> str:
        return self.config.provider

    @property
    def provider_model(self) -> str:
        return self.spec.provider_model or self.spec.name

    def identity_extra(self) -> dict[str, Any]:
        """Backend-specific facts that decide the pixels (an endpoint, an API version)."""
        return {}

    def identity(self, params: GenerationParams) -> BackendIdentity:
        # The host is part of the identity: another server behind the same model id may
        # make other pixels. Keys never are.
        return BackendIdentity(
            backend=self.provider,
            model_revision=self.provider_model,
            pipeline=type(self).__name__,
            extra={"host": self.config.host, **self.identity_extra()},
        )

    def check_prompt(self, prompt: str) -> None:
        limit = self.spec.extra.get("max_prompt_chars")
        if isinstance(limit, int) and len(prompt) > limit:
            raise PromptTooLongError(
                f"prompt is {len(prompt)} characters; {self.spec.name} accepts at most {limit}",
                provider=self.provider,
                param="prompt",
            )

    def require_size_and_seeds(self, params: GenerationParams, *, seed_max: int) -> None:
        """Positive sides and every image's seed (seed + i) inside the provider's range."""
        if params.width <= 0 or params.height <= 0:
            raise InvalidParamsError(
                f"size must be WIDTHxHEIGHT with positive sides, got "
                f"'{params.width}x{params.height}'",
                provider=self.provider,
                param="size",
            )
        seeds = params.image_seeds()
        if min(seeds) < 0 or max(seeds) > seed_max:
            raise InvalidParamsError(
                f"seed must be 0..{seed_max} for {self.provider} (image i uses seed + i), "
                f"got {params.seed} with n={params.n}",
                provider=self.provider,
                param="seed",
            )

    def price_key(self, spec: ModelSpec | None = None) -> str | None:
        """The price-table name for `spec` (default: this backend's): the catalogue name, else
        the provider's model id (a user's own entry for a priced model)."""
        spec = spec or self.spec
        for name in (spec.name, spec.provider_model):
            if name and self.prices.rows_for(name):
                return name
        return None

    async def close(self) -> None:
        await self.http.aclose()


def make_hosted_backend(
    spec: ModelSpec,
    config: ProviderConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    sleep: SleepFn | None = None,
    prices: PriceTable | None = None,
) -> Backend:
    """The backend for a hosted catalogue entry. `transport` and `sleep` are test seams (an
    httpx transport; an async sleep that records the retry waits)."""
    target = _BACKENDS.get(spec.kind)
    if target is None:
        raise ValueError(
            f"model '{spec.name}' has kind '{spec.kind}', which is not hosted; "
            f"hosted kinds are {sorted(_BACKENDS)}"
        )
    module_name, class_name = target
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = backend_cls(spec, config, transport=transport, sleep=sleep, prices=prices)
    return backend
