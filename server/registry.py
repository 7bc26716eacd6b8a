"""The backend registry: one Backend per catalogue model, created on first use, and the
device worker that owns every local pipeline."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from models.base import Backend, ModelSpec
from models.catalogue import Catalogue
from models.local.residency import Policy, Residency
from models.local.worker import DeviceWorker, Runner, WorkerObserver

__all__ = ["BackendRegistry", "WorkerObserver"]
from server import errors
from server.settings import Settings


class BackendRegistry:
    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        *,
        observer: WorkerObserver | None = None,
        wrap: Callable[[Backend], Backend] | None = None,
        wrap_runner: Callable[[Runner], Runner] | None = None,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        # Test seams: every backend passes through `wrap` once, when it is created (a fake
        # that forces a failure around the real backend), and every local pipeline runner
        # through `wrap_runner` (a fake that blocks or fails around the real device calls).
        self._wrap = wrap
        self._wrap_runner = wrap_runner
        local = settings.local
        # One device, one worker thread: diffusers pipelines are not thread-safe.
        self.worker = DeviceWorker(
            name=local.device,
            max_batch_images=local.max_batch_size,
            batch_window_s=local.batch_window_ms / 1000.0,
            max_queue_images=local.max_queue_images,
            observer=observer,
            on_fault=self._device_failed,
            residency=Residency(
                device=local.device,
                budgets=self._budgets,
                policies={
                    name: Policy(pinned=p.pinned, idle_unload_s=p.idle_unload_s)
                    for name, p in local.model_policies.items()
                },
            ),
        )
        self._fault_listeners: list[Callable[[str], None]] = []
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def _budgets(self) -> tuple[int | None, int]:
        """The device's budget and its host tier's (models.local.residency), asked on the
        worker thread before the first load."""
        from models.local.residency import device_budget, host_budget
        from models.local.runtime import pick_device

        local = self.settings.local
        device = pick_device(local.device)
        # Named as it resolved ("auto" -> "cuda") in listings and messages from now on.
        self.worker.name = self.worker.residency.device = device
        return (
            device_budget(device, memory_gb=local.memory_gb, reserve_gb=local.memory_reserve_gb),
            host_budget(device, host_memory_gb=local.host_memory_gb),
        )

    def spec(self, name: str) -> ModelSpec:
        spec = self.catalogue.get(name)
        if spec is None:
            raise errors.ModelNotFoundError.for_model(name)
        return spec

    def backend_for(self, name: str) -> Backend:
        """The backend of a catalogue model. Which models a request may use (local-only,
        fallbacks) is the router's decision, made before this is asked."""
        spec = self.spec(name)
        # Asked from the service's worker threads: one backend per model, however many ask at
        # once (two would mean two copies of the weights).
        with self._lock:
            backend = self._backends.get(name)
            if backend is None:
                backend = self._create(spec)
                if self._wrap is not None:
                    backend = self._wrap(backend)
                self._backends[name] = backend
        return backend

    def _create(self, spec: ModelSpec) -> Backend:
        if spec.is_local:
            from models.local.backend import DiffusersBackend
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
                lora_dir=self.settings.lora_dir,
                max_loaded_loras=local.max_loaded_loras,
            )
            return DiffusersBackend(
                spec,
                data_dir=self.settings.data_dir,
                worker=self.worker,
                options=options,
                wrap_runner=self._wrap_runner,
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

    def watch(self, observer: WorkerObserver) -> None:
        if self.worker.observer is None:
            self.worker.observer = observer

    def device_fault(self) -> str | None:
        """Why the device worker stopped for good (a sticky device fault), or None."""
        return self.worker.fault

    def on_device_fault(self, listener: Callable[[str], None]) -> None:
        """Call `listener(message)` (from the worker thread) when the device fails for good."""
        self._fault_listeners.append(listener)

    def _device_failed(self, message: str) -> None:
        for listener in list(self._fault_listeners):
            listener(message)

    def describe(self) -> list[dict[str, Any]]:
        from models.local import sources

        rows = []
        places = {place.name: place for place in self.worker.residency.places()}
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
                found = sources.availability(spec.source, data_dir=self.settings.data_dir)
                row["builtin"] = found.builtin
                row["on_disk"] = found.on_disk
                row["available"] = found.available
                if found.reason is not None:
                    row["reason"] = found.reason
                # Where its weights are (models.local.residency): on the device, in host RAM
                # (evicted, fast to bring back) or only on disk; what they take once loaded.
                place = places.get(name)
                row["where"] = place.where if place is not None else "disk"
                row["device"] = self.worker.name
                row["footprint_bytes"] = place.footprint_bytes if place is not None else None
                row["pinned"] = self.worker.residency.policy(name).pinned
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

    def devices(self) -> list[dict[str, Any]]:
        """Each device's budget and what loaded models take of it (and of its host tier)."""
        residency = self.worker.residency
        return [
            {
                "device": self.worker.name,
                "budget_bytes": residency.budget_bytes,
                "used_bytes": residency.used_bytes("device"),
                "host_budget_bytes": residency.host_budget_bytes,
                "host_used_bytes": residency.used_bytes("host"),
                "loads": residency.loads,
                "evictions": residency.evictions,
            }
        ]

    async def aclose(self) -> None:
        for backend in self._backends.values():
            with contextlib.suppress(Exception):  # closing is best effort at shutdown
                await backend.close()
        self.worker.stop()
