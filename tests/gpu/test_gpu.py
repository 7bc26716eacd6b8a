"""GPU tests, opt-in (IMAGEGEN_GPU_TESTS=1 on a CUDA machine): the half-precision paths that a
CPU never takes — fp16 SDXL, bf16 Flux, the fp32 VAE retry — on the real tiny pipelines."""

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
