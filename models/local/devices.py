"""The local devices: one DeviceWorker per device (each with its own queue, batcher and resident
set), and where a request goes among them.

Placement, per request: a device that already holds the model (loaded on it, not just in its
host tier) with the shortest expected wait; otherwise the device that is least loaded, where
the model is then loaded (its Residency evicts to make room). A model gets a replica on a
second device only when every device holding it is busy past a full batch and another device
is idle enough to be sooner, and never more than `max_replicas` copies. A device whose worker
failed for good (a sticky device fault) takes nothing more; the others carry on, and only when
none is left does the pool report the fault.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.base import DeviceFaultError, QueueFullError
from models.local.worker import Demand, DeviceWorker


class DevicePool:
    def __init__(self, workers: Sequence[DeviceWorker], *, max_replicas: int | None = None) -> None:
        """`max_replicas` None: as many copies of a model as there are devices ("auto")."""
        if not workers:
            raise ValueError("a device pool needs at least one device")
        self.workers = list(workers)
        self.max_replicas = max_replicas or len(self.workers)

    @property
    def first(self) -> DeviceWorker:
        return self.workers[0]

    def live(self) -> list[DeviceWorker]:
        return [w for w in self.workers if w.fault is None]

    def fault(self) -> str | None:
        """Why no device can work any more, or None while one still can."""
        if self.live():
            return None
        return "; ".join(f"{w.name}: {w.fault}" for w in self.workers)

    def place(self, demand: Demand) -> DeviceWorker:
        """The worker `demand` should run on (module docstring). Raises what no device could
        take it for: a device fault when none is left, else the full queue with the soonest
        Retry-After."""
        model = demand.model
        live = self.live()
        if not live:
            # Every worker refuses with its own fault error; the first one's says why.
            self.first.admit(demand)
            raise DeviceFaultError("every local device has failed", provider="local")
        holding = [w for w in live if w.residency.where(model) == "device"]
        others = [w for w in live if w not in holding]
        ordered: list[DeviceWorker]
        if holding:
            ordered = sorted(holding, key=DeviceWorker.expected_wait_s)
            best = ordered[0]
            spare = sorted(others, key=DeviceWorker.expected_wait_s)
            copies = sum(1 for w in live if w.residency.where(model) != "disk")
            if (
                spare
                and copies < self.max_replicas
                and best.queued_images() >= best.max_batch_images
                and spare[0].expected_wait_s() < best.expected_wait_s()
            ):
                ordered = [spare[0], *ordered]
            ordered += [w for w in spare if w not in ordered]
        else:
            # A copy in a device's host tier comes back faster than one from disk.
            ordered = sorted(
                live,
                key=lambda w: (
                    w.residency.where(model) != "host",
                    w.expected_wait_s(),
                    w.residency.used_bytes(),
                ),
            )
        refusals: list[QueueFullError] = []
        for worker in ordered:
            try:
                worker.admit(demand)
            except QueueFullError as exc:
                refusals.append(exc)
                continue
            return worker
        raise min(refusals, key=lambda e: e.retry_after_s or 0)
