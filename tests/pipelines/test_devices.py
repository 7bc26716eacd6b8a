"""Several devices (models.local.devices) on the CPU split into `cpu:0` and `cpu:1`, each its own
worker, with the real tiny pipelines: requests for two models run on both devices at once, a
model's requests stay with the device that holds it, and a device that fails for good moves
traffic to the other with no request lost beyond the one it was running."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from server import errors
from server.request import ImageRequest
from server.service import ImageService
from server.settings import Settings
from tests.helpers_server import WatchedRunner, watched_service

DEADLINE_S = 120  # only stops a hung test
FATAL = RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """A CPU split into devices sets each worker's thread count, and torch keeps the last one
    set as the default of every thread made after: give later tests the host's own again."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def two_devices(data_dir: Any) -> Iterator[tuple[ImageService, list[WatchedRunner]]]:
    settings = Settings(
        data_dir=data_dir, local={"devices": ["cpu:0", "cpu:1"], "batch_window_ms": 0}
    )
    service, runners = watched_service(settings)
    try:
        yield service, runners
    finally:
        service.close()


def request(model: str, seed: int, prompt: str = "a boat") -> ImageRequest:
    return ImageRequest(prompt=prompt, model=model, width=64, height=64, seed=seed, steps=3, n=1)


def runner_of(runners: list[WatchedRunner], model: str, device: str) -> WatchedRunner:
    (found,) = [
        r for r in runners if r.inner.spec.name == model and r.inner.options.device == device
    ]
    return found


def test_two_models_run_on_two_devices_at_once(
    two_devices: tuple[ImageService, list[WatchedRunner]],
) -> None:
    service, runners = two_devices

    async def scenario() -> list[str]:
        first = asyncio.create_task(service.generate(request("tiny-sdxl", 1, "held")))
        # The first model's batch holds after its first step on whichever device took it...
        while not runners:
            await asyncio.sleep(0.01)
        held = runners[0]
        held.hold()
        await asyncio.to_thread(held.holding.wait, DEADLINE_S)
        # ...and the second model, meanwhile, is served in full: by the other device.
        second = await asyncio.wait_for(
            service.generate(request("tiny-flux", 2)), timeout=DEADLINE_S
        )
        assert not first.done()
        held.release()
        done = await asyncio.wait_for(first, timeout=DEADLINE_S)
        return [done.images[0].sha256, second.images[0].sha256]

    asyncio.run(scenario())
    devices = {r.inner.spec.name: r.inner.options.device for r in runners}
    assert devices["tiny-sdxl"] != devices["tiny-flux"]
    assert set(devices.values()) == {"cpu:0", "cpu:1"}
    # Both devices were busy at once: the held call spans the other's whole call.
    (held,) = runner_of(runners, "tiny-sdxl", devices["tiny-sdxl"]).batches
    (other,) = runner_of(runners, "tiny-flux", devices["tiny-flux"]).batches
    assert held.started_at < other.started_at < other.ended_at < held.ended_at
    # Each worker ran with its share of the cores, not all of them each.
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert held.threads == other.threads == share


def test_a_model_stays_with_the_device_that_holds_it(
    two_devices: tuple[ImageService, list[WatchedRunner]],
) -> None:
    service, runners = two_devices

    async def scenario() -> None:
        for seed in range(4):
            await service.generate(request("tiny-sdxl", seed))

    asyncio.run(scenario())
    # One copy: a sequential client never fills a batch, so no replica is worth loading.
    (only,) = runners
    assert len(only.batches) == 4
    places = [w.residency.where("tiny-sdxl") for w in service.registry.workers]
    assert sorted(places) == ["device", "disk"]


def test_a_failed_device_moves_traffic_to_the_other(
    two_devices: tuple[ImageService, list[WatchedRunner]],
) -> None:
    service, runners = two_devices
    registry = service.registry

    async def scenario() -> tuple[list[BaseException], int]:
        await service.generate(request("tiny-sdxl", 0))
        (first,) = runners
        first.failing = FATAL
        failures: list[BaseException] = []
        served = 0
        for seed in range(1, 8):
            try:
                await service.generate(request("tiny-sdxl", seed))
                served += 1
            except Exception as exc:  # the one in flight on the failing device
                failures.append(exc)
        return failures, served

    failures, served = asyncio.run(scenario())
    assert len(failures) == 1 and served == 6
    assert "device" in str(failures[0]).lower()
    dead = [w for w in registry.workers if w.fault is not None]
    assert len(dead) == 1
    # Not a fault of the server while one device is left.
    assert registry.device_fault() is None
    # The other device took the rest.
    survivor = runner_of(
        runners, "tiny-sdxl", next(w.name for w in registry.workers if w.fault is None)
    )
    assert len(survivor.batches) == 6


def test_the_server_fails_only_when_every_device_has(
    two_devices: tuple[ImageService, list[WatchedRunner]],
) -> None:
    service, runners = two_devices
    told: list[str] = []
    service.registry.on_device_fault(told.append)

    async def scenario() -> None:
        for seed in range(2):
            await service.generate(request("tiny-sdxl", seed))
            runners[-1].failing = FATAL
            with pytest.raises(errors.DeviceFaultError):
                await service.generate(request("tiny-sdxl", 10 + seed))
        with pytest.raises(errors.DeviceFaultError):
            await service.generate(request("tiny-sdxl", 99))

    asyncio.run(scenario())
    assert service.registry.device_fault() is not None
    assert len(told) == 1


def test_each_device_has_its_own_budget(data_dir: Any) -> None:
    settings = Settings(
        data_dir=data_dir,
        local={
            "devices": ["cpu:0", "cpu:1"],
            "memory_gb": 1.0,
            "device_memory_gb": {"cpu:1": 2.0},
        },
    )
    service = ImageService(settings)
    try:
        backend = service.registry.backend_for("tiny-flux")
        # Listed before either device has loaded anything: each with its budget already.
        budgets = {d["device"]: d["budget_bytes"] for d in service.registry.devices()}
        assert budgets == {"cpu:0": 1024**3, "cpu:1": 2 * 1024**3}
        for worker in service.registry.workers:
            asyncio.run(backend.load(worker))
        budgets = {d["device"]: d["budget_bytes"] for d in service.registry.devices()}
        assert budgets == {"cpu:0": 1024**3, "cpu:1": 2 * 1024**3}
        assert all(w.residency.where("tiny-flux") == "device" for w in service.registry.workers)
    finally:
        service.close()
