"""The backend registry: one Backend per catalogue model, created on first use, and the
local devices (one worker each, models.local.devices) that own every local pipeline."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from models.base import Backend, ModelSpec
from models.catalogue import Catalogue
from models.local.devices import DevicePool
from models.local.residency import ModelPlace, Policy, Residency
from models.local.worker import DeviceWorker, Runner, WorkerObserver
from server import errors
from server.settings import Settings

__all__ = ["BackendRegistry", "WorkerObserver"]

log = logging.getLogger(__name__)


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
        self._observer = observer
        # Made on first use (which devices there are may take asking torch, which listing
        # models must not import).
        self._pool: DevicePool | None = None
        self._pool_lock = threading.Lock()  # not _lock: backends are made holding that
        self._fault_listeners: list[Callable[[str], None]] = []
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    @property
    def pool(self) -> DevicePool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = self._make_pool()
            return self._pool

    def _make_pool(self) -> DevicePool:
        local = self.settings.local
        policies = {
            name: Policy(pinned=p.pinned, idle_unload_s=p.idle_unload_s)
            for name, p in local.model_policies.items()
        }
        names = self._device_names()
        # A CPU split into several devices gives each its share of the cores.
        cpus = [name for name in names if name.partition(":")[0] == "cpu"]
        threads = max(1, len(os.sched_getaffinity(0)) // len(cpus)) if len(cpus) > 1 else None
        # One worker thread per device: diffusers pipelines are not thread-safe, and each
        # device has its own queue, batcher and resident set.
        workers = [
            DeviceWorker(
                name=device,
                max_batch_images=local.max_batch_size,
                batch_window_s=local.batch_window_ms / 1000.0,
                max_queue_images=local.max_queue_images,
                max_queue_seconds=local.max_queue_seconds,
                observer=self._observer,
                on_fault=self._device_failed,
                residency=Residency(
                    device=device,
                    budgets=self._budgets_of(device),
                    policies=policies,
                    reserve_bytes=int(local.memory_reserve_gb * 1024**3),
                ),
                threads=threads if device in cpus else None,
            )
            for device in names
        ]
        replicas = None if local.replicas == "auto" else local.replicas
        return DevicePool(workers, max_replicas=replicas)

    def _device_names(self) -> list[str]:
        """`local.devices`; unset, every visible GPU where `local.device` is "auto" and there
        are several, else the one `local.device`."""
        local = self.settings.local
        if local.devices:
            return list(local.devices)
        if local.device == "auto":
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count > 1:
                return [f"cuda:{i}" for i in range(count)]
        return [local.device]

    def _started_workers(self) -> list[DeviceWorker]:
        """The workers, if the pool has been made (nothing to report or stop before)."""
        return self._pool.workers if self._pool is not None else []

    @property
    def worker(self) -> DeviceWorker:
        """The first device's worker (the only one on a one-device server)."""
        return self.pool.first

    @property
    def workers(self) -> list[DeviceWorker]:
        return self.pool.workers

    def _budgets_of(self, name: str) -> Callable[[], tuple[int | None, int]]:
        def budgets() -> tuple[int | None, int]:
            """The device's budget and its host tier's (models.local.residency), asked on
            its worker's thread before the first load."""
            from models.local.residency import device_budget, host_budget
            from models.local.runtime import pick_device

            local = self.settings.local
            device = pick_device(name)
            memory_gb = local.device_memory_gb.get(name, local.memory_gb)
            if device != name:
                # Named as it resolved ("auto" -> "cuda") in listings and messages from now on.
                for worker in self.workers:
                    if worker.name == name:
                        worker.name = worker.residency.device = device
            return (
                device_budget(device, memory_gb=memory_gb, reserve_gb=local.memory_reserve_gb),
                host_budget(device, host_memory_gb=local.host_memory_gb),
            )

        return budgets

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
                worker=self.pool,
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
        if self._observer is None:
            self._observer = observer
        for worker in self._started_workers():
            if worker.observer is None:
                worker.observer = observer

    def device_fault(self) -> str | None:
        """Why no local device can work any more (each failed for good: a sticky device
        fault), or None while one still can: traffic moves to the devices left."""
        return self._pool.fault() if self._pool is not None else None

    def on_device_fault(self, listener: Callable[[str], None]) -> None:
        """Call `listener(message)` (from the worker thread) when the device fails for good."""
        self._fault_listeners.append(listener)

    def _device_failed(self, message: str) -> None:
        # One device lost is a smaller server; the last one lost is a server to restart.
        fault = self.device_fault()
        if fault is None:
            log.error("a local device failed, %d left: %s", len(self.pool.live()), message)
            return
        for listener in list(self._fault_listeners):
            listener(fault)

    def describe(self) -> list[dict[str, Any]]:
        from models.local import sources

        rows = []
        places: dict[str, tuple[str, ModelPlace]] = {}
        # Where each model is best placed: on a device over in a host tier over on disk.
        rank = {"device": 0, "host": 1, "disk": 2}
        for worker in self._started_workers():
            for place in worker.residency.places():
                seen = places.get(place.name)
                if seen is None or rank[place.where] < rank[seen[1].where]:
                    places[place.name] = (worker.name, place)
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
                found_place = places.get(name)
                if found_place is None:
                    row.update(where="disk", device=None, footprint_bytes=None, mode=None)
                else:
                    device, place = found_place
                    row["where"] = place.where
                    row["device"] = device if place.where != "disk" else None
                    row["footprint_bytes"] = place.footprint_bytes
                    row["mode"] = place.mode
                policy = self.settings.local.model_policies.get(name)
                row["pinned"] = bool(policy and policy.pinned)
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
        for worker in self._started_workers():
            worker.residency.resolve_budgets()
        return [
            {
                "device": worker.name,
                "budget_bytes": worker.residency.budget_bytes,
                "used_bytes": worker.residency.used_bytes("device"),
                "free_bytes": _free(worker.residency),
                "host_budget_bytes": worker.residency.host_budget_bytes,
                "host_used_bytes": worker.residency.used_bytes("host"),
                "loads": worker.residency.loads,
                "evictions": worker.residency.evictions,
                "queued_images": worker.queued_images(),
                "failed": worker.fault,
            }
            for worker in self._started_workers()
        ]

    async def aclose(self) -> None:
        for backend in self._backends.values():
            with contextlib.suppress(Exception):  # closing is best effort at shutdown
                await backend.close()
        for worker in self._started_workers():
            worker.stop()


def _free(residency: Residency) -> int | None:
    if residency.budget_bytes is None:
        return None
    return max(0, residency.budget_bytes - residency.used_bytes("device"))
