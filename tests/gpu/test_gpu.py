"""GPU tests, opt-in (IMAGEGEN_GPU_TESTS=1 on a CUDA machine): the half-precision paths that a
CPU never takes — fp16 SDXL, bf16 Flux, the fp32 VAE retry — on the real tiny pipelines, and
SDXL at its real size with random weights."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        os.environ.get("IMAGEGEN_GPU_TESTS") != "1",
        reason="GPU tests are opt-in: set IMAGEGEN_GPU_TESTS=1 on a CUDA machine",
    ),
]


@pytest.fixture
def cuda_service(data_dir: Path) -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    from server.service import ImageService
    from server.settings import LocalSettings, Settings

    svc = ImageService(Settings(data_dir=data_dir, local=LocalSettings(device="cuda")))
    yield svc
    svc.close()


def _run(svc: Any, **fields: Any) -> Any:
    from server.service import ImageRequest

    return asyncio.run(svc.generate(ImageRequest(**fields)))


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize(("model", "dtype"), [("tiny-sdxl", "float16"), ("tiny-flux", "bfloat16")])
def test_half_precision_on_cuda(cuda_service: Any, model: str, dtype: str) -> None:
    result = _run(cuda_service, prompt="a red fox", model=model, seed=3, width=128, height=128)
    backend = cuda_service.registry.backend_for(model)
    identity = backend.identity(result.params)
    assert identity.device == "cuda" and identity.dtype == dtype
    assert result.images[0].quality["ok"], result.images[0].quality
    assert Image.open(io.BytesIO(result.images[0].data)).size == (128, 128)


def test_batched_matches_solo_on_cuda(cuda_service: Any) -> None:
    pair = _run(cuda_service, prompt="a harbour", n=2, seed=7)
    solo = _run(cuda_service, prompt="a harbour", n=1, seed=8)
    diff = int(np.abs(_pixels(pair.images[1].data) - _pixels(solo.images[0].data)).max())
    print(f"cuda fp16 batched-vs-solo max pixel difference: {diff}")
    assert diff <= 2


def test_precise_mode_runs_the_vae_in_fp32_and_restores_it(cuda_service: Any) -> None:
    import torch

    from server.service import ImageRequest

    backend = cuda_service.registry.backend_for("tiny-sdxl")
    params = cuda_service.prepare(ImageRequest(prompt="a road", seed=1)).params
    backend.runner.load()
    vae = backend.runner.pipe.vae
    vae.register_to_config(force_upcast=False)  # as a fixed fp16 VAE ships
    result = asyncio.run(backend.generate(params, precise=True))
    assert result.images and not result.images[0].warnings
    assert vae.dtype == torch.float16
    assert vae.config.force_upcast is False


def test_full_size_sdxl_with_random_weights_runs_a_1024_step(tmp_path: Path) -> None:
    """The real SDXL sizes (models.local.fullsize, no download): built on the device in fp16,
    one 1024x1024 step through a PipelineRunner. Prints what it took, for the record."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    from models.base import GenerationParams
    from models.catalogue import Catalogue
    from models.local import fullsize
    from models.local.pipeline import PipelineRunner, RuntimeOptions

    entry = {"name": "sdxl-random", "kind": "sdxl", "source": "random:sdxl-base-1.0"}
    spec = Catalogue.load([entry]).specs["sdxl-random"]
    runner = PipelineRunner(spec, data_dir=tmp_path, options=RuntimeOptions(device="cuda"))
    runner.load()
    unet = runner.pipe.unet
    assert unet.device.type == "cuda" and unet.dtype == torch.float16
    parameters = sum(fullsize.parameter_counts("sdxl-base-1.0").values())
    assert runner.footprint_bytes() >= 2 * parameters  # two bytes each, every one on the device
    params = GenerationParams(
        prompt="a fox",
        model="sdxl-random",
        width=1024,
        height=1024,
        n=1,
        seed=1,
        steps=1,
        guidance_scale=5.0,
    )
    out = runner.run_batch([params])
    image = out.images[0][0]
    print(
        f"random sdxl-base-1.0 fp16: {runner.footprint_bytes() / 1024**3:.2f} GiB of weights, "
        f"one 1024x1024 step in {out.device_seconds:.2f} s"
    )
    assert (image.width, image.height) == (1024, 1024)
    assert image.pixels.shape == (1024, 1024, 3)
    assert "non-finite values" not in image.warnings, image.warnings
