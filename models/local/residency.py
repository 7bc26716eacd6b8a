"""What stays loaded on a device: a memory budget, each model's measured footprint, and least-
recently-used eviction, first to host RAM (fast to bring back) and then off entirely.

One Residency per device worker, used only on that worker's thread, between batches: a model is
never evicted mid-batch because nothing else runs while the next batch's model is made resident.
Footprints are measured after a load (the bytes of every parameter and buffer of the pipeline's
modules, each module once: the txt2img, img2img and inpaint pipelines of a model share theirs;
on CUDA the allocator's own counter where it says more), never guessed from file sizes.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from models.base import OutOfMemoryError

log = logging.getLogger(__name__)

Where = Literal["device", "host", "disk"]
# How a loaded model runs (models.local.pipeline.PipelineRunner.mode): whole on the device, or,
# too big for its budget, offloaded (CUDA) or with only its VAE in tiles (a CPU).
Mode = Literal["whole", "offloaded", "tiled"]


class Resident(Protocol):
    """A model that can be loaded, moved to host RAM and back, and dropped
    (models.local.pipeline.PipelineRunner)."""

    @property
    def name(self) -> str: ...

    @property
    def where(self) -> Where: ...

    @property
    def mode(self) -> Mode: ...

    def load(self) -> None: ...

    def offload(self) -> None: ...

    def unload(self) -> None: ...

    def to_host(self) -> None: ...

    def to_device(self) -> None: ...

    def footprint_bytes(self) -> int: ...

    def expected_bytes(self) -> int: ...


@dataclass(frozen=True)
class Policy:
    """How one model is kept: `pinned` models are never evicted (and are loaded at start-up);
    `idle_unload_s` drops a model unused for that long."""

    pinned: bool = False
    idle_unload_s: float | None = None


@dataclass
class _Entry:
    resident: Resident
    footprint: int = 0  # measured at its last load; 0 until then
    last_used: float = 0.0


MoveKind = Literal["load", "restore", "to_host", "drop"]
_MOVE_WORDS: dict[MoveKind, str] = {
    "load": "loaded",
    "restore": "brought back from host RAM",
    "to_host": "moved to host RAM to make room",
    "drop": "unloaded",
}


@dataclass(frozen=True)
class Move:
    """One move of a model's weights, and how long it took."""

    kind: MoveKind
    model: str
    seconds: float


@dataclass(frozen=True)
class ModelPlace:
    """Where one model is, for /v1/models and the metrics."""

    name: str
    where: Where
    footprint_bytes: int
    pinned: bool
    mode: Mode = "whole"


class Residency:
    def __init__(
        self,
        *,
        device: str,
        budget_bytes: int | None = None,
        host_budget_bytes: int = 0,
        budgets: Callable[[], tuple[int | None, int]] | None = None,
        policies: Mapping[str, Policy] | None = None,
        reserve_bytes: int = 0,
    ) -> None:
        """`budget_bytes` None: no limit. `host_budget_bytes` 0: no host tier (a CPU device,
        whose memory is the host's: an evicted model is dropped). `budgets`, where given,
        works both out on the worker thread before the first load (asking the device means
        importing torch, which listing models must not). `reserve_bytes` is the working room
        kept beside the budget for the activations of a batch (local.memory_reserve_gb)."""
        self.device = device
        self.budget_bytes = budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self._budgets = budgets
        self._budgets_lock = threading.Lock()
        self.policies = dict(policies or {})
        self.reserve_bytes = reserve_bytes
        self._entries: dict[str, _Entry] = {}
        self.loads = 0
        self.evictions = 0
        # The latest moves of weights, oldest first.
        self.moves: deque[Move] = deque(maxlen=64)

    # -- the worker thread ---------------------------------------------------------------

    def ensure(self, resident: Resident) -> None:
        """Make `resident` loaded on the device, evicting least-recently-used others first so
        that it fits (its footprint is known from its last load; a first load evicts after, as
        soon as it is measured)."""
        self.resolve_budgets()
        entry = self._entries.setdefault(resident.name, _Entry(resident))
        entry.resident = resident
        if resident.where != "device":
            # Room first, so that a load never crowds past the budget on its way in: for
            # what it took last time, or on a first load what its weights declare.
            if entry.footprint == 0 and resident.where == "disk":
                entry.footprint = resident.expected_bytes()
                if self._offloaded_if_too_big(entry, "its weights declare"):
                    entry.footprint = 0  # its largest component's: known once loaded
            self._make_room(entry.footprint, keep=resident.name)
            try:
                self._bring(resident)
            except Exception as exc:
                if type(exc).__name__ != "OutOfMemoryError":  # torch's, by name: no import
                    raise
                # The budget was too generous for what else holds the device: everything that
                # may go goes, and the load is tried once more.
                log.warning(
                    "%s: out of memory loading on %s; evicting all", resident.name, self.device
                )
                resident.unload()
                self._evict_all(keep=resident.name)
                self._bring_shrinking(resident)
            entry.footprint = resident.footprint_bytes()
            if self._offloaded_if_too_big(entry, "it measured loaded"):
                entry.footprint = resident.footprint_bytes()
            self._make_room(0, keep=resident.name)
            if self.budget_bytes is not None and entry.footprint > self.budget_bytes:
                log.warning(
                    "%s needs %.2f GB on %s, over its budget of %.2f GB (local.memory_gb)",
                    resident.name,
                    entry.footprint / 1024**3,
                    self.device,
                    self.budget_bytes / 1024**3,
                )
        entry.last_used = time.monotonic()

    def resolve_budgets(self) -> None:
        """Work out the budgets given as `budgets`, once (before the first load, or when a
        listing asks first)."""
        with self._budgets_lock:
            if self._budgets is not None:
                self.budget_bytes, self.host_budget_bytes = self._budgets()
                self._budgets = None

    def sweep(self, now: float | None = None) -> None:
        """Drop the models whose idle_unload_s has passed."""
        now = time.monotonic() if now is None else now
        for name, entry in list(self._entries.items()):
            idle = self.policy(name).idle_unload_s
            due = idle is not None and now - entry.last_used >= idle
            if due and entry.resident.where != "disk":
                log.info("%s: unused for %.0f s, unloaded (idle_unload_s)", name, idle)
                self._drop(entry)

    def next_sweep_s(self) -> float | None:
        """Seconds until the next idle unload is due (None: none is)."""
        due = [
            entry.last_used + idle - time.monotonic()
            for name, entry in self._entries.items()
            if (idle := self.policy(name).idle_unload_s) is not None
            and entry.resident.where != "disk"
        ]
        return max(0.0, min(due)) if due else None

    # -- facts ---------------------------------------------------------------------------

    def policy(self, name: str) -> Policy:
        return self.policies.get(name, Policy())

    def where(self, name: str) -> Where:
        entry = self._entries.get(name)
        return entry.resident.where if entry is not None else "disk"

    def used_bytes(self, where: Where = "device") -> int:
        entries = list(self._entries.values())  # read from other threads too
        return sum(e.footprint for e in entries if e.resident.where == where)

    def activation_room(self) -> int | None:
        """The bytes a batch may take for its working memory now: the budget and the reserve,
        less what the loaded models take (None: no budget, no limit)."""
        if self.budget_bytes is None:
            return None
        return max(0, self.budget_bytes + self.reserve_bytes - self.used_bytes("device"))

    def places(self) -> list[ModelPlace]:
        return [
            ModelPlace(
                name=name,
                where=entry.resident.where,
                footprint_bytes=entry.footprint,
                pinned=self.policy(name).pinned,
                mode=entry.resident.mode,
            )
            # A copy first: other threads read this while the worker's may add an entry.
            for name, entry in list(self._entries.items())
        ]

    # -- eviction ------------------------------------------------------------------------

    def _bring_shrinking(self, resident: Resident) -> None:
        """Load `resident` once more with the device as empty as it gets; still out of
        memory, once more offloaded (models.local.pipeline.PipelineRunner.mode) where it ran
        whole; only then fail."""
        for last_try in (resident.mode != "whole", True):
            try:
                self._bring(resident)
                return
            except Exception as exc:
                if type(exc).__name__ != "OutOfMemoryError":
                    raise
                resident.unload()
                _release_device_memory()
                if last_try:
                    break
                log.warning("%s: out of memory loading whole; loading it offloaded", resident.name)
                resident.offload()
        raise OutOfMemoryError(
            f"model '{resident.name}' does not fit on {self.device} even offloaded with every "
            "other unpinned model evicted; raise local.memory_gb, unpin a model, or serve it "
            "from a device with more memory"
        ) from None

    def _offloaded_if_too_big(self, entry: _Entry, source: str) -> bool:
        """Turn the model to running offloaded (models.local.pipeline.PipelineRunner.mode)
        where its footprint (`source` says where the figure is from) cannot fit whole."""
        resident = entry.resident
        if resident.mode != "whole" or not self._too_big(entry):
            return False
        log.warning(
            "%s: %.2f GB (%s) is more than %s's budget leaves (local.memory_gb); running it "
            "offloaded",
            resident.name,
            entry.footprint / 1024**3,
            source,
            self.device,
        )
        resident.offload()
        _release_device_memory()
        return True

    def _too_big(self, entry: _Entry) -> bool:
        """Whether the model cannot fit whole even with every unpinned other evicted."""
        if self.budget_bytes is None:
            return False
        pinned = sum(
            e.footprint
            for name, e in self._entries.items()
            if e is not entry and e.resident.where == "device" and self.policy(name).pinned
        )
        return entry.footprint > self.budget_bytes - pinned

    def _bring(self, resident: Resident) -> None:
        if resident.where == "host":
            self._timed("restore", resident.name, resident.to_device)
        else:
            self._timed("load", resident.name, resident.load)
            self.loads += 1

    def _timed(self, op: MoveKind, name: str, move: Callable[[], None]) -> None:
        """Run one move of a model's weights and keep how long it took (for the log, and
        scripts/gpu_residency.py's figures), the device's memory handed back after an
        eviction."""
        start = time.perf_counter()
        move()
        if op in ("to_host", "drop"):
            _release_device_memory()
        seconds = time.perf_counter() - start
        self.moves.append(Move(op, name, seconds))
        log.info("%s: %s on %s in %.2f s", name, _MOVE_WORDS[op], self.device, seconds)

    def _evict_all(self, *, keep: str) -> None:
        while (victim := self._least_recent("device", keep=keep)) is not None:
            self._evict(victim)
        _release_device_memory()

    def _make_room(self, needed: int, *, keep: str) -> None:
        if self.budget_bytes is None:
            return
        while self.used_bytes("device") + needed > self.budget_bytes:
            victim = self._least_recent("device", keep=keep)
            if victim is None:
                return  # only pinned models (and the one being loaded) are left
            self._evict(victim)

    def _least_recent(self, where: Where, *, keep: str) -> _Entry | None:
        candidates = [
            e
            for name, e in self._entries.items()
            if e.resident.where == where and name != keep and not self.policy(name).pinned
        ]
        return min(candidates, key=lambda e: e.last_used, default=None)

    def _evict(self, entry: _Entry) -> None:
        self.evictions += 1
        if 0 < entry.footprint <= self.host_budget_bytes:
            while self.used_bytes("host") + entry.footprint > self.host_budget_bytes:
                oldest = self._least_recent("host", keep=entry.resident.name)
                if oldest is None:
                    break
                self._drop(oldest)
            if self.used_bytes("host") + entry.footprint <= self.host_budget_bytes:
                self._timed("to_host", entry.resident.name, entry.resident.to_host)
                return
        self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        self._timed("drop", entry.resident.name, entry.resident.unload)


_GB = 1024**3


def device_budget(device: str, *, memory_gb: float | None, reserve_gb: float) -> int:
    """The bytes loaded models may take on `device` ("cpu", "cuda", "cuda:1"): `memory_gb`
    where set, else what the device has less the reserve."""
    if memory_gb is not None:
        return int(memory_gb * _GB)
    if device.startswith("cuda"):
        import torch

        total = int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    else:
        total = host_memory_bytes()
    return max(0, total - int(reserve_gb * _GB))


def host_budget(device: str, *, host_memory_gb: float | None) -> int:
    """The host RAM for models evicted from `device`: none for the CPU (its models are in
    host RAM already), else `host_memory_gb` or half the host's RAM."""
    if not device.startswith("cuda"):
        return 0
    if host_memory_gb is not None:
        return int(host_memory_gb * _GB)
    return host_memory_bytes() // 2


def host_memory_bytes() -> int:
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _release_device_memory() -> None:
    """Collect what the unloaded modules held, and hand CUDA's cached blocks back, so that the
    device's memory returns to what it was before the model was loaded."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
