"""Model residency (models.local.residency) on the real tiny pipelines and one device worker:
with a budget that fits two of three models, requests that alternate across the three are all
served, least-recently-used models make room, a pinned model is never evicted, and an idle
model is unloaded after its idle_unload_s."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.base import GenerationParams, OutOfMemoryError
from models.catalogue import Catalogue
from models.local.backend import DiffusersBackend
from models.local.pipeline import PipelineRunner, RuntimeOptions
from models.local.residency import Mode, Policy, Residency, Where
from models.local.worker import DeviceWorker
from tests.pipelines.test_image_inputs import encode, picture, square_mask

MODELS = ("tiny-sdxl", "tiny-sdxl-inpaint", "tiny-flux")
DEADLINE_S = 120  # only stops a hung test


def params(name: str, seed: int) -> GenerationParams:
    """A request each model can serve (the inpainting model takes an image and a mask)."""
    spec = Catalogue.load().specs[name]
    inputs = (
        {"images": (encode(picture(1)),), "mask": encode(square_mask())}
        if name == "tiny-sdxl-inpaint"
        else {}
    )
    return GenerationParams(
        prompt="a boat",
        model=name,
        width=64,
        height=64,
        n=1,
        seed=seed,
        steps=2,
        guidance_scale=2.0,
        scheduler=spec.defaults.scheduler,
        **inputs,
    )


@pytest.fixture
def footprints(data_dir: Path) -> dict[str, int]:
    """Each model's measured footprint (a first load with no budget)."""
    worker = DeviceWorker(name="cpu")
    try:
        backends = _backends(worker, data_dir)
        for backend in backends.values():
            worker.make_resident(backend.runner).result(timeout=DEADLINE_S)
        return {name: b.runner.footprint_bytes() for name, b in backends.items()}
    finally:
        worker.stop()


def _backends(worker: DeviceWorker, data_dir: Path) -> dict[str, DiffusersBackend]:
    catalogue = Catalogue.load()
    return {
        name: DiffusersBackend(
            catalogue.specs[name],
            data_dir=data_dir,
            worker=worker,
            options=RuntimeOptions(device="cpu"),
        )
        for name in MODELS
    }


@pytest.fixture
def two_of_three(data_dir: Path, footprints: dict[str, int]) -> Iterator[DeviceWorker]:
    """A worker whose budget holds the two largest models but not all three."""
    sizes = sorted(footprints.values())
    budget = sizes[1] + sizes[2]
    assert sum(sizes) > budget
    worker = DeviceWorker(name="cpu", residency=Residency(device="cpu", budget_bytes=budget))
    yield worker
    worker.stop()


def test_alternating_across_three_models_evicts_the_least_recent_and_never_fails(
    two_of_three: DeviceWorker, data_dir: Path
) -> None:
    import asyncio

    worker = two_of_three
    backends = _backends(worker, data_dir)
    residency = worker.residency

    async def run(name: str, seed: int) -> None:
        result = await backends[name].generate(params(name, seed))
        assert len(result.images) == 1

    order = ["tiny-sdxl", "tiny-sdxl-inpaint", "tiny-flux"] * 2 + ["tiny-flux", "tiny-sdxl"]
    seen: list[dict[str, str]] = []
    for seed, name in enumerate(order):
        asyncio.run(run(name, seed))
        seen.append({p.name: p.where for p in residency.places()})
        assert residency.budget_bytes is not None
        assert residency.used_bytes() <= residency.budget_bytes
    # The third model in pushed out the least recently used one (the first); on the CPU an
    # evicted model is dropped (its memory is the host's already).
    assert seen[2] == {"tiny-sdxl": "disk", "tiny-sdxl-inpaint": "device", "tiny-flux": "device"}
    assert seen[3]["tiny-sdxl"] == "device" and seen[3]["tiny-sdxl-inpaint"] == "disk"
    # A repeat of a resident model evicts nothing.
    assert seen[6] == seen[5]
    assert residency.evictions >= 4


def test_a_pinned_model_is_never_evicted(data_dir: Path, footprints: dict[str, int]) -> None:
    import asyncio

    sizes = sorted(footprints.values())
    residency = Residency(
        device="cpu",
        budget_bytes=sizes[1] + sizes[2],
        policies={"tiny-sdxl": Policy(pinned=True)},
    )
    worker = DeviceWorker(name="cpu", residency=residency)
    try:
        backends = _backends(worker, data_dir)
        for seed, name in enumerate(["tiny-sdxl", "tiny-sdxl-inpaint", "tiny-flux"] * 2):
            asyncio.run(backends[name].generate(params(name, seed)))
            places = {p.name: p.where for p in residency.places()}
            assert places["tiny-sdxl"] == "device"
        assert residency.evictions >= 3
    finally:
        worker.stop()


def test_an_idle_model_is_unloaded_after_its_idle_unload_s(data_dir: Path) -> None:
    import asyncio
    import time

    residency = Residency(
        device="cpu", budget_bytes=None, policies={"tiny-flux": Policy(idle_unload_s=0.2)}
    )
    worker = DeviceWorker(name="cpu", residency=residency)
    try:
        backends = _backends(worker, data_dir)
        asyncio.run(backends["tiny-flux"].generate(params("tiny-flux", 1)))
        asyncio.run(backends["tiny-sdxl"].generate(params("tiny-sdxl", 1)))
        deadline = time.monotonic() + DEADLINE_S
        while backends["tiny-flux"].runner.where != "disk":
            assert time.monotonic() < deadline, "the idle model was never unloaded"
            time.sleep(0.05)
        # Only the model with the policy goes.
        assert backends["tiny-sdxl"].runner.where == "device"
        # And it comes back on the next request.
        asyncio.run(backends["tiny-flux"].generate(params("tiny-flux", 2)))
    finally:
        worker.stop()


class TightDevice:
    """A real runner whose loads run out of device memory the first `fails` times (forced:
    the CPU has no device memory to run out of)."""

    def __init__(self, inner: PipelineRunner, fails: int) -> None:
        self.inner, self.fails = inner, fails

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def where(self) -> Where:
        return self.inner.where

    @property
    def mode(self) -> Mode:
        return self.inner.mode

    def offload(self) -> None:
        self.inner.offload()

    def load(self) -> None:
        import torch

        if self.fails > 0:
            self.fails -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        self.inner.load()

    def unload(self) -> None:
        self.inner.unload()

    def to_host(self) -> None:
        self.inner.to_host()

    def to_device(self) -> None:
        self.inner.to_device()

    def footprint_bytes(self) -> int:
        return self.inner.footprint_bytes()

    def expected_bytes(self) -> int:
        return self.inner.expected_bytes()


def _runner(name: str, data_dir: Path) -> PipelineRunner:
    spec = Catalogue.load().specs[name]
    return PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions(device="cpu"))


def test_a_load_out_of_memory_evicts_every_unpinned_model_and_tries_again(
    data_dir: Path,
) -> None:
    residency = Residency(
        device="cpu", budget_bytes=None, policies={"tiny-sdxl": Policy(pinned=True)}
    )
    pinned, other = _runner("tiny-sdxl", data_dir), _runner("tiny-sdxl-inpaint", data_dir)
    residency.ensure(pinned)
    residency.ensure(other)
    tight = TightDevice(_runner("tiny-flux", data_dir), fails=1)
    residency.ensure(tight)
    assert (tight.where, other.where, pinned.where) == ("device", "disk", "device")
    # Out of memory twice whole: loaded offloaded (on a CPU, whose weights are in host RAM
    # already, that is the VAE in tiles).
    shrunk = TightDevice(_runner("tiny-flux-fill", data_dir), fails=2)
    residency.ensure(shrunk)
    assert (shrunk.where, shrunk.mode) == ("device", "tiled")
    assert shrunk.inner.pipe.vae.use_tiling
    # Out of memory every time: a retryable error naming the settings, and nothing left half
    # loaded.
    hopeless = TightDevice(_runner("tiny-flux-kontext", data_dir), fails=3)
    with pytest.raises(OutOfMemoryError) as caught:
        residency.ensure(hopeless)
    assert "local.memory_gb" in caught.value.message
    assert hopeless.where == "disk" and pinned.where == "device"


def test_a_model_bigger_than_its_budget_runs_shrunk_instead_of_failing(
    data_dir: Path, footprints: dict[str, int]
) -> None:
    """A model too big for its device's budget is not refused: on CUDA it runs offloaded
    (diffusers' model CPU offload, the VAE in tiles); on the CPU, whose weights are in host RAM
    anyway, with its VAE in tiles. The decision stays across unload and reload."""
    import asyncio

    residency = Residency(device="cpu", budget_bytes=footprints["tiny-sdxl"] // 2)
    worker = DeviceWorker(name="cpu", residency=residency)
    try:
        backend = _backends(worker, data_dir)["tiny-sdxl"]
        result = asyncio.run(backend.generate(params("tiny-sdxl", 3)))
        assert len(result.images) == 1
        runner = backend.runner
        assert (runner.where, runner.mode) == ("device", "tiled")
        assert runner.pipe.vae.use_tiling  # and it stays on after the call
        assert [p.mode for p in residency.places()] == ["tiled"]
        worker.call(runner.unload).result(timeout=DEADLINE_S)
        asyncio.run(backend.generate(params("tiny-sdxl", 4)))
        assert runner.mode == "tiled" and runner.pipe.vae.use_tiling
    finally:
        worker.stop()


def test_a_first_load_makes_room_for_what_the_weights_declare(
    data_dir: Path, footprints: dict[str, int]
) -> None:
    """Before a model's first load its footprint is what its .safetensors headers declare at
    its dtype (models.local.footprints): within 1 % of what the load then measures (buffers
    that are not saved, such as CLIP's position ids, are the rest), so room is made before
    the load and the budget is never crowded on the way in."""
    for name in MODELS:
        expected = _runner(name, data_dir).expected_bytes()
        assert abs(expected - footprints[name]) <= 0.01 * footprints[name]
    sizes = sorted(footprints.values())
    residency = Residency(device="cpu", budget_bytes=sizes[1] + sizes[2])
    watched: list[int] = []

    class Watching(TightDevice):
        def load(self) -> None:
            watched.append(residency.used_bytes())  # what the device held as the load began
            super().load()

    for name in ("tiny-sdxl", "tiny-sdxl-inpaint", "tiny-flux"):
        residency.ensure(Watching(_runner(name, data_dir), fails=0))
    # The third load began with room made for it already.
    assert watched[2] + footprints["tiny-flux"] <= sizes[1] + sizes[2]
