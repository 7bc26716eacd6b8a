"""Live previews (models.local.previews) on the real tiny pipelines: a step's preview is a picture
of that request's own denoising state, for every family's latent layout (SDXL's grid, Flux's
packed tokens), at the preview size; and a preview nobody asks for is never rendered."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.base import GenerationParams
from models.catalogue import Catalogue
from models.local.pipeline import PipelineRunner, RuntimeOptions
from models.local.previews import PREVIEW_MAX_SIDE, preview_size
from tests.pipelines.test_image_inputs import encode, picture, square_mask


def runner(name: str, data_dir: Path) -> PipelineRunner:
    spec = Catalogue.load([]).get(name)
    assert spec is not None
    run = PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions(device="cpu"))
    run.load()
    return run


def params(name: str, seed: int, **extra: Any) -> GenerationParams:
    spec = Catalogue.load([]).get(name)
    assert spec is not None
    size = {"width": 64, "height": 64, **extra}
    return GenerationParams(
        prompt="a red cube",
        model=name,
        n=1,
        seed=seed,
        steps=4,
        guidance_scale=2.0,
        scheduler=spec.defaults.scheduler,
        **size,
    )


def final_previews(
    run: PipelineRunner, batch: list[GenerationParams]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The last step's preview of each image, and the images themselves."""
    shown: dict[int, np.ndarray] = {}

    def on_step(step: int, total: int, render: Callable[[int], Any]) -> None:
        if step == total:
            for i in range(len(batch)):
                shown[i] = np.asarray(render(i)).astype(float)

    out = run.run_batch(batch, on_step=on_step)
    images = [row[0].pixels.astype(float) for row in out.images]
    return [shown[i] for i in range(len(batch))], images


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-flux"])
def test_each_preview_looks_most_like_its_own_image(name: str, data_dir: Path) -> None:
    """Three seeds in one call: the final step's preview of each correlates with its own
    decoded image more than with the others' (the tiny VAEs are random, so the projection
    is rough, but it is a projection of that image's latents, by index)."""
    run = runner(name, data_dir)
    shown, images = final_previews(run, [params(name, seed) for seed in (1, 2, 3)])
    for preview in shown:
        assert preview.shape == (64, 64, 3)
    corr = np.array(
        [[np.corrcoef(p.reshape(-1), img.reshape(-1))[0, 1] for img in images] for p in shown]
    )
    for i in range(3):
        others = [corr[i, j] for j in range(3) if j != i]
        assert corr[i, i] > max(others), corr


def test_edit_pipelines_preview_too(data_dir: Path) -> None:
    """Inpainting (SDXL's 9-channel UNet), Flux Fill and Kontext, whose denoisers take more
    than the latents (a mask, image tokens): the preview is of the output latents alone, at
    the output's aspect (Kontext here at 64x48, so Flux's tokens unpack to a non-square grid)."""
    init, mask = encode(picture(1)), encode(square_mask())
    for name in ("tiny-sdxl-inpaint", "tiny-flux-fill"):
        run = runner(name, data_dir)
        shown, _ = final_previews(run, [params(name, 1, images=(init,), mask=mask)])
        assert shown[0].shape == (64, 64, 3)
    run = runner("tiny-flux-kontext", data_dir)
    wide = encode(picture(2, 64, 48))
    shown, _ = final_previews(
        run, [params("tiny-flux-kontext", 1, images=(wide,), width=64, height=48)]
    )
    assert shown[0].shape == (48, 64, 3)


def test_preview_size_keeps_the_aspect_within_the_cap() -> None:
    assert preview_size(64, 64) == (64, 64)
    assert preview_size(1024, 1024) == (PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE)
    assert preview_size(1536, 1024) == (PREVIEW_MAX_SIDE, round(1024 * PREVIEW_MAX_SIDE / 1536))
