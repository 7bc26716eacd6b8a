"""Memory-aware admission (models.local.activations) on the real tiny pipelines: a batch whose
working memory would not fit beside the loaded model is split before it runs, into calls whose
pixels are those of one call; measured peaks replace the family's prior; running out of memory
teaches the worker to split that size next time. A CPU has no allocator counters: the measured
peaks are reported through WatchedRunner.peak_per_image (forced), the splitting is real."""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.base import Events, GenerationParams, OutOfMemoryError
from models.catalogue import Catalogue
from models.local import activations, families
from models.local.backend import DiffusersBackend
from models.local.pipeline import RuntimeOptions
from models.local.residency import Residency
from models.local.worker import DeviceWorker, Runner
from tests.helpers_server import WatchedRunner

MODEL = "tiny-sdxl"
DEADLINE_S = 120  # only stops a hung test


def params(n: int, *, seed: int = 5, size: int = 64) -> GenerationParams:
    return GenerationParams(
        prompt="a harbour", model=MODEL, width=size, height=size, n=n, seed=seed, steps=2
    )


def decoded(png: bytes) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def per_image_prior(size: int = 64) -> int:
    """The family's prior for one image of the tiny SDXL model on the CPU (float32)."""
    gib = families.family("sdxl").activation_gib_per_megapixel
    return activations.prior_bytes(gib, size, size, dtype_bytes=4)


@dataclass
class Device:
    worker: DeviceWorker
    backend: DiffusersBackend
    runner: WatchedRunner
    progress: list[tuple[int, int]] = field(default_factory=list)

    def generate(self, request: GenerationParams) -> list[bytes]:
        events = Progress(self.progress)
        result = asyncio.run(self.backend.generate(request, events))
        return [image.data for image in result.images]

    def calls(self) -> list[int]:
        """The images of each pipeline call so far."""
        return [batch.images for batch in self.runner.batches]


class Progress(Events):
    def __init__(self, seen: list[tuple[int, int]]) -> None:
        self.seen = seen

    def progress(self, step: int, total: int, preview: object = None) -> None:
        self.seen.append((step, total))


def _device(data_dir: Path, *, room_images: float | None) -> Iterator[Device]:
    """A CPU worker whose budget leaves room for `room_images` images' prior working memory
    beside the tiny model (None: no budget)."""
    residency = Residency(device="cpu", budget_bytes=None)
    worker = DeviceWorker(name="cpu", residency=residency)
    runners: list[WatchedRunner] = []

    def watch(inner: Runner) -> Runner:
        runners.append(WatchedRunner(inner))
        return runners[-1]

    backend = DiffusersBackend(
        Catalogue.load().specs[MODEL],
        data_dir=data_dir,
        worker=worker,
        options=RuntimeOptions(device="cpu"),
        wrap_runner=watch,
    )
    asyncio.run(backend.load())
    if room_images is not None:
        # The model's own footprint is the budget; the reserve is the room for activations.
        residency.budget_bytes = backend.runner.footprint_bytes()
        residency.reserve_bytes = int(per_image_prior() * room_images)
    try:
        yield Device(worker, backend, runners[0])
    finally:
        worker.stop()


@pytest.fixture
def unbounded(data_dir: Path) -> Iterator[Device]:
    yield from _device(data_dir, room_images=None)


@pytest.fixture
def room_for_two(data_dir: Path) -> Iterator[Device]:
    yield from _device(data_dir, room_images=2.5)


def test_a_batch_that_would_not_fit_is_split_before_it_runs_into_calls_with_the_same_pixels(
    room_for_two: Device, unbounded: Device
) -> None:
    whole = unbounded.generate(params(5))
    assert unbounded.calls() == [5]

    split = room_for_two.generate(params(5))
    # 5 images, 2 fit: three calls, as even as they can be; the request's five images, in
    # order, are those of the one call (within one level: a batch's size may change the
    # matmul kernels, as for any batched call).
    assert room_for_two.calls() == [2, 2, 1]
    assert len(split) == len(whole) == 5
    for cut, one in zip(split, whole, strict=True):
        assert np.abs(decoded(cut) - decoded(one)).max() <= 1
    # Its progress runs once across the three calls (2 steps each), never backwards.
    steps = [step for step, _ in room_for_two.progress]
    assert steps == sorted(steps) and steps[-1] == 6
    assert {total for _, total in room_for_two.progress} == {6}


def test_measured_peaks_replace_the_prior(room_for_two: Device) -> None:
    device = room_for_two
    room = device.worker.residency.activation_room()
    assert room is not None
    # The device measures each image at the whole room: only one fits at a time from now on.
    device.runner.peak_per_image = room
    device.generate(params(3))
    # The first call was cut by the prior (2 fit), and its peak measured.
    assert device.calls() == [2, 1]
    device.generate(params(3, seed=9))
    assert device.calls()[2:] == [1, 1, 1]
    # Another size of the same model scales from the measured one (by pixels, with a margin):
    # a quarter of the pixels fits about four at a time, not the prior's ten.
    fit = device.worker.memory.images_that_fit(
        MODEL, 32, 32, per_image_prior(32), device.worker.residency.activation_room()
    )
    assert fit == math.floor(4 / 1.15)


def test_running_out_of_memory_splits_that_size_before_it_runs_next_time(
    data_dir: Path,
) -> None:
    for device in _device(data_dir, room_images=8):
        # Out of memory once, for the whole batch of four: recovered split in half...
        device.runner.failing = OutOfMemoryError("forced: out of GPU memory for 4 images")
        device.runner.failures = 1
        assert len(device.generate(params(4))) == 4
        assert device.calls() == [4, 2, 2]
        # ...and the next batch of that size is split before it is attempted.
        device.generate(params(4, seed=11))
        assert device.calls()[3:] == [2, 2]


def test_concurrent_requests_gather_no_more_than_one_call_fits(room_for_two: Device) -> None:
    device = room_for_two
    started: list[int] = []

    class Started(Events):
        def __init__(self, seed: int) -> None:
            self.seed = seed

        def started(self) -> None:
            started.append(self.seed)

    async def four() -> None:
        device.runner.hold()  # the first call holds, so that the others queue up behind it
        runs = [asyncio.ensure_future(device.backend.generate(params(1, seed=1), Started(1)))]
        await asyncio.to_thread(device.runner.holding.wait, DEADLINE_S)
        for seed in (2, 3, 4):
            runs.append(
                asyncio.ensure_future(device.backend.generate(params(1, seed=seed), Started(seed)))
            )
        while device.worker.queued_images() < 4:
            await asyncio.sleep(0.01)
        device.runner.release()
        # The second call holds too: two of the three queued requests are in it, the third
        # still waits in the queue (not behind this batch's calls).
        device.runner.hold()
        await asyncio.to_thread(device.runner.holding.wait, DEADLINE_S)
        assert sorted(started) == [1, 2, 3]
        device.runner.release()
        await asyncio.gather(*runs)

    asyncio.run(four())
    assert device.calls() == [1, 2, 1]
    assert started == [1, 2, 3, 4]
