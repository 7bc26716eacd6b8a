"""Hosted backends: OpenAI, Stability AI, Black Forest Labs, midjourney-proxy, remote imagegen.

They implement the same `models.base.Backend` contract as the local diffusers backends, so the
service applies cache, sanitizer, cost and ledger to all alike. Importing this package is cheap
(the settings import it for the provider ids and `ProviderConfig`): each backend module, httpx
and the `openai` SDK are imported only when `make_hosted_backend` needs them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from models.base import Backend, ModelSpec
from models.hosted.config import ProviderConfig, ProviderConfigError

if TYPE_CHECKING:
    import httpx

    from models.hosted.retry import SleepFn
    from models.prices import PriceTable

__all__ = [
    "HOSTED_KINDS",
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
