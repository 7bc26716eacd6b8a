"""The backend registry: one Backend per catalogue model, created on first use, and the
device worker that owns every local pipeline."""

from __future__ import annotations

import contextlib
from typing import Any

from models import base
from models.base import Backend, ModelSpec
from models.catalogue import Catalogue
from models.local.worker import DeviceWorker, WorkerObserver
from server import errors
from server.settings import Settings


class BackendRegistry:
    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        *,
        observer: WorkerObserver | None = None,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        local = settings.local
        # One device, one worker thread: diffusers pipelines are not thread-safe.
        self.worker = DeviceWorker(
            name=local.device,
            max_batch_images=local.max_batch_size,
            batch_window_s=local.batch_window_ms / 1000.0,
            max_queue_images=local.max_queue_images,
            observer=observer,
        )
        self._backends: dict[str, Backend] = {}

    def spec(self, name: str) -> ModelSpec:
        spec = self.catalogue.get(name)
        if spec is None:
            raise errors.ModelNotFoundError.for_model(name)
        return spec

    def backend_for(self, name: str) -> Backend:
        """The backend of a catalogue model. Which models a request may use (local-only,
        fallbacks) is the router's decision, made before this is asked."""
        spec = self.spec(name)
        backend = self._backends.get(name)
        if backend is None:
            backend = self._create(spec)
            self._backends[name] = backend
        return backend

    def _create(self, spec: ModelSpec) -> Backend:
        if spec.is_local:
            from models.local.backend import make_local_backend
            from models.local.pipeline import RuntimeOptions

            local = self.settings.local
            options = RuntimeOptions(
                device=local.device,
                attention=local.attention,
                vae_slicing=local.vae_slicing,
                vae_tiling=local.vae_tiling,
                cpu_offload=local.cpu_offload,
                compile=local.compile,
                flux_true_cfg_scale=local.flux_true_cfg_scale,
            )
            return make_local_backend(
                spec, data_dir=self.settings.data_dir, worker=self.worker, options=options
            )
        return self._create_hosted(spec)

    def _create_hosted(self, spec: ModelSpec) -> Backend:
        from models.hosted import make_hosted_backend
        from models.hosted.config import ProviderConfig

        provider_id = spec.source or spec.kind
        # Settings validated every configured section when they were built; a provider with
        # no section gets its defaults (no key: the backend answers with the setting to set).
        config = self.settings.providers.get(provider_id)
        if config is None:
            try:
                config = ProviderConfig.from_mapping(provider_id, {})
            except ValueError as exc:  # no public base_url: the section is required
                raise errors.InvalidRequestError(str(exc), param="model") from None
        return make_hosted_backend(spec, config)

    def loaded_backends(self) -> dict[str, Backend]:
        return dict(self._backends)

    def describe(self) -> list[dict[str, Any]]:
        from models.local import sources, tiny

        rows = []
        for name in self.catalogue.names():
            spec = self.catalogue.specs[name]
            backend = self._backends.get(name)
            row: dict[str, Any] = {
                "name": name,
                "kind": spec.kind,
                "provider": "local" if spec.is_local else spec.kind,
                "source": spec.source,
                "description": spec.description,
                "loaded": bool(backend is not None and backend.loaded and spec.is_local),
            }
            if spec.is_local:
                kind = sources.classify(spec.source)
                row["builtin"] = kind == "builtin"
                if kind == "builtin":
                    folder = tiny.tiny_model_dir(
                        self.settings.data_dir, spec.source.removeprefix("builtin:")
                    )
                    row["on_disk"] = tiny.is_built(folder)
                    row["available"] = True  # built on first use, offline
                else:
                    try:
                        sources.check_available(spec.source, data_dir=self.settings.data_dir)
                        row["on_disk"] = row["available"] = True
                    except base.ModelUnavailableError as exc:
                        row["on_disk"] = row["available"] = False
                        row["reason"] = exc.message
            else:
                configured = spec.source in self.settings.providers or (
                    spec.kind in self.settings.providers
                )
                row["builtin"] = False
                row["on_disk"] = False
                row["available"] = configured and not self.settings.local_only
                if not configured:
                    row["reason"] = f"set providers.{spec.source or spec.kind}.api_key"
            rows.append(row)
        return rows

    async def aclose(self) -> None:
        for backend in self._backends.values():
            with contextlib.suppress(Exception):  # closing is best effort at shutdown
                await backend.close()
        self.worker.stop()
