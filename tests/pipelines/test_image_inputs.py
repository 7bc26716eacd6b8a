"""Image inputs on the real tiny pipelines: img2img strength, inpainting's paste-back (exact
outside the mask, feathered by mask_blur, "only masked" crops), batching of edits, Kontext,
the dedicated inpainting checkpoints, shared weights between a family's pipelines, and the
backend's checks of the edit fields."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.base import GenerationParams, InputImage, InvalidParamsError, LoraRef
from models.catalogue import Catalogue
from models.local.backend import DiffusersBackend
from models.local.pipeline import PipelineRunner, RuntimeOptions
from models.local.worker import DeviceWorker, WorkItem, batch_key

SIZE = 64


def encode(pixels: Any) -> InputImage:
    """An input as the server edge hands it over: PNG bytes and their hash."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data = buf.getvalue()
    height, width = pixels.shape[:2]
    return InputImage(
        data=data, sha256=hashlib.sha256(data).hexdigest(), width=width, height=height
    )


def picture(seed: int, width: int = SIZE, height: int = SIZE) -> Any:
    """A smooth picture (gradients and a disc), not noise: the tiny models turn noise into
    noise, so only a structured input shows how much of it survives."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 215, 3)
    slope = rng.uniform(-1.5, 1.5, (3, 2))
    out = np.stack(
        [
            base[c] + slope[c, 0] * (x - width / 2) + slope[c, 1] * (y - height / 2)
            for c in range(3)
        ],
        axis=-1,
    )
    disc = (x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) / 5) ** 2
    out[disc] = rng.uniform(0, 255, 3)
    return np.clip(out, 0, 255).astype(np.uint8)


def square_mask(
    width: int = SIZE, height: int = SIZE, box: tuple[int, int, int, int] = (16, 16, 48, 48)
) -> Any:
    mask = np.zeros((height, width), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return mask


def params(model: str, seed: int = 1, **fields: Any) -> GenerationParams:
    spec = Catalogue.load().specs[model]
    values: dict[str, Any] = {
        "prompt": "a red boat",
        "model": model,
        "width": SIZE,
        "height": SIZE,
        "n": 1,
        "seed": seed,
        "steps": 10,
        "guidance_scale": spec.defaults.guidance_scale,
        "scheduler": spec.defaults.scheduler,
    }
    values.update(fields)
    return GenerationParams(**values)


def runner(model: str, data_dir: Path) -> PipelineRunner:
    return PipelineRunner(
        Catalogue.load().specs[model], data_dir=data_dir, options=RuntimeOptions()
    )


def backend(model: str, data_dir: Path, worker: DeviceWorker | None = None) -> DiffusersBackend:
    return DiffusersBackend(
        Catalogue.load().specs[model],
        data_dir=data_dir,
        worker=worker or DeviceWorker(),
        options=RuntimeOptions(),
    )


def generate(run: PipelineRunner, request: GenerationParams) -> Any:
    return run.run_batch([request]).images[0][0]


def mean_difference(a: Any, b: Any) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# -- img2img -----------------------------------------------------------------------------------


def vae_round_trip(run: PipelineRunner, source: Any) -> Any:
    """The input through the model's own VAE: the closest to the input any result of it can
    be (the tiny VAEs have random weights and keep little of a picture)."""
    import torch

    x = torch.from_numpy(source).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        vae = run.pipe.vae
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]
    return ((y.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)


@pytest.mark.parametrize("seed", [3, 4])
def test_img2img_moves_further_from_the_input_as_strength_grows(seed: int, data_dir: Path) -> None:
    """On tiny-flux, whose flow-matching start is (1 - s) * image + s * noise. tiny-sdxl's
    random UNet cannot show it: its latents (scaled by 0.18215) drown in the noise of even
    strength 0.2, so every strength lands equally far from the input."""
    run = runner("tiny-flux", data_dir)
    run.load()
    source = picture(seed)
    image = encode(source)
    closest = vae_round_trip(run, source)
    distances = [
        mean_difference(
            generate(run, params("tiny-flux", images=(image,), strength=s)).pixels, closest
        )
        for s in (0.2, 0.5, 0.9)
    ]
    assert distances[0] < distances[1] < distances[2], distances


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_the_input_image_leads_the_result(model: str, data_dir: Path) -> None:
    run = runner(model, data_dir)
    results = [
        generate(run, params(model, images=(encode(picture(s)),), strength=0.5)).pixels
        for s in (3, 4)
    ]
    assert mean_difference(results[0], results[1]) > 1


def test_the_same_seed_and_input_give_the_same_bytes(data_dir: Path) -> None:
    request = params("tiny-sdxl", images=(encode(picture(5)),), strength=0.6)
    first = generate(runner("tiny-sdxl", data_dir), request)
    again = generate(runner("tiny-sdxl", data_dir), request)
    assert first.data == again.data


def test_from_pipe_shares_the_loaded_weights_and_keeps_each_tasks_pipeline(
    data_dir: Path,
) -> None:
    import torch

    for model, denoiser in (("tiny-sdxl", "unet"), ("tiny-flux", "transformer")):
        run = runner(model, data_dir)
        run.load()
        base = run.pipe
        before = sum(p.numel() for p in getattr(base, denoiser).parameters())
        for task in ("img2img", "inpaint"):
            derived = run.pipeline_for(task)
            assert type(derived).__name__ == run.pipeline_name(task)
            assert derived is not base
            assert getattr(derived, denoiser) is getattr(base, denoiser)
            assert derived.vae is base.vae and derived.text_encoder is base.text_encoder
            assert run.pipeline_for(task) is derived  # kept, not made again
        # from_pipe's own default would have cast the shared modules to float32.
        assert getattr(base, denoiser).dtype == torch.float32 == base.vae.dtype
        assert sum(p.numel() for p in getattr(base, denoiser).parameters()) == before
        assert run.pipeline_for("txt2img") is base


def test_an_edit_leaves_text_to_image_as_it_was(data_dir: Path) -> None:
    """The task pipelines share modules and, until a scheduler is chosen, the scheduler: an
    edit in between changes nothing of a text-to-image request's pixels."""
    run = runner("tiny-sdxl", data_dir)
    plain = params("tiny-sdxl", seed=21)
    before = generate(run, plain).data
    generate(run, params("tiny-sdxl", images=(encode(picture(1)),), strength=0.5))
    generate(run, params("tiny-sdxl", images=(encode(picture(1)),), mask=encode(square_mask())))
    assert generate(run, plain).data == before


# -- inpainting --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux", "tiny-sdxl-inpaint", "tiny-flux-fill"])
def test_inpainting_keeps_every_pixel_outside_the_mask(model: str, data_dir: Path) -> None:
    source, mask = picture(6), square_mask()
    out = generate(
        runner(model, data_dir), params(model, images=(encode(source),), mask=encode(mask))
    ).pixels
    outside, inside = mask == 0, mask == 255
    assert np.array_equal(out[outside], source[outside])
    assert mean_difference(out[inside], source[inside]) > 5


def test_mask_blur_feathers_the_edge_and_leaves_the_rest_exact(data_dir: Path) -> None:
    run = runner("tiny-sdxl", data_dir)
    source, mask = picture(7), square_mask()
    request = params("tiny-sdxl", images=(encode(source),), mask=encode(mask))
    hard = generate(run, request).pixels
    soft = generate(run, dataclasses.replace(request, mask_blur=3)).pixels
    # Just outside the square (2 pixels off its left edge): blended, neither original nor new.
    band = (slice(20, 44), 14)
    assert mean_difference(soft[band], source[band]) > 0
    assert np.array_equal(hard[band], source[band])
    # Far from it, the original's pixels exactly.
    far = square_mask(box=(0, 0, SIZE, SIZE)) - square_mask(box=(4, 4, 60, 60))
    assert np.array_equal(soft[far > 0], source[far > 0])
    # The feather is a blend: near the edge inside, between the original and the hard result.
    edge = (slice(20, 44), 16)
    lo = np.minimum(source[edge], hard[edge]).astype(int) - 1
    hi = np.maximum(source[edge], hard[edge]).astype(int) + 1
    assert ((soft[edge] >= lo) & (soft[edge] <= hi)).mean() > 0.9


def test_only_masked_inpainting_returns_the_whole_image_changed_only_in_the_mask(
    data_dir: Path,
) -> None:
    """A small edit on a bigger image: the crop around the mask is generated at the working
    size (64x64) and pasted back into the 160x96 original."""
    width, height = 160, 96
    source = picture(8, width, height)
    mask = square_mask(width, height, box=(100, 30, 120, 50))
    request = params(
        "tiny-sdxl",
        images=(encode(source),),
        mask=encode(mask),
        inpaint_area="masked",
        inpaint_padding=8,
    )
    resolved = backend("tiny-sdxl", data_dir).resolve(request)  # sizes may differ here
    image = generate(runner("tiny-sdxl", data_dir), resolved)
    assert (image.width, image.height) == (width, height)
    out = image.pixels
    assert out.shape == (height, width, 3)
    assert np.array_equal(out[mask == 0], source[mask == 0])
    assert mean_difference(out[mask == 255], source[mask == 255]) > 5


def test_the_crop_box_is_padded_kept_inside_and_of_the_working_shape() -> None:
    from models.local.images import crop_box

    mask = square_mask(160, 96, box=(100, 30, 120, 50))
    assert crop_box(mask, 8, (64, 64)) == (92, 22, 128, 58)
    # A wide working size widens the box about its centre.
    assert crop_box(mask, 8, (128, 64)) == (74, 22, 146, 58)
    # At the right edge the box shifts inside the image rather than shrinking.
    edge = square_mask(160, 96, box=(150, 40, 160, 50))
    left, top, right, bottom = crop_box(edge, 4, (64, 64))
    assert right == 160 and right - left == bottom - top
    # An empty mask: the whole image.
    assert crop_box(np.zeros((96, 160), np.uint8), 8, (64, 64)) == (0, 0, 160, 96)


# -- batching ----------------------------------------------------------------------------------


class Calls:
    """The worker's observer: images per pipeline call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def batch_done(
        self, model: str, images: int, device_seconds: float, queue_waits: list[float]
    ) -> None:
        self.batches.append(images)

    def queue_depth(self, device: str, images: int) -> None:
        pass


def _run_held(run: PipelineRunner, requests: list[GenerationParams]) -> tuple[list[Any], list[int]]:
    """Submit `requests` while the worker is held, so that all are queued when it looks."""
    calls = Calls()
    worker = DeviceWorker(observer=calls)
    try:
        worker.call(run.load).result(timeout=120)
        release = threading.Event()
        worker.call(release.wait)
        items = [worker.submit(WorkItem(params=p, runner=run)) for p in requests]
        release.set()
        results = [item.future.result(timeout=300).images[0] for item in items]
    finally:
        worker.stop()
    return results, calls.batches


def test_edits_with_different_images_share_one_call_and_match_alone(data_dir: Path) -> None:
    run = runner("tiny-sdxl", data_dir)
    requests = [
        params("tiny-sdxl", seed=s, images=(encode(picture(s)),), strength=0.6) for s in (11, 12)
    ]
    together, batches = _run_held(run, requests)
    assert batches == [2]
    for request, image in zip(requests, together, strict=True):
        alone = generate(run, request).pixels
        assert np.abs(alone.astype(int) - image.pixels.astype(int)).max() <= 1
    assert mean_difference(together[0].pixels, together[1].pixels) > 5


def test_an_edit_never_shares_a_call_with_text_to_image(data_dir: Path) -> None:
    run = runner("tiny-sdxl", data_dir)
    edit = params("tiny-sdxl", seed=1, images=(encode(picture(1)),), strength=0.6)
    plain = params("tiny-sdxl", seed=2)
    inpaint = params("tiny-sdxl", seed=3, images=(encode(picture(1)),), mask=encode(square_mask()))
    assert len({batch_key(edit), batch_key(plain), batch_key(inpaint)}) == 3
    assert batch_key(edit) != batch_key(dataclasses.replace(edit, strength=0.7))
    _, batches = _run_held(run, [edit, plain, inpaint])
    assert batches == [1, 1, 1]


# -- Kontext -----------------------------------------------------------------------------------


def test_a_kontext_edit_runs_through_the_backend(data_dir: Path) -> None:
    kontext = backend("tiny-flux-kontext", data_dir)
    source = picture(9)
    request = params(
        "tiny-flux-kontext", steps=None, images=(encode(source),), prompt="make it blue"
    )
    assert kontext.unsupported(request) is None
    resolved = kontext.resolve(request)
    assert resolved.strength is None  # Kontext takes none
    assert kontext.identity(resolved).pipeline == "FluxKontextPipeline"
    try:
        result = asyncio.run(kontext.generate(resolved))
    finally:
        kontext.pool.first.stop()
    [image] = result.images
    assert (image.width, image.height) == (SIZE, SIZE)
    # The reference image conditions the result: another one changes it.
    run = runner("tiny-flux-kontext", data_dir)
    other = generate(run, dataclasses.replace(resolved, images=(encode(picture(10)),))).pixels
    assert mean_difference(image.pixels, other) > 0


def test_what_a_family_cannot_do_is_refused_with_the_reason(data_dir: Path) -> None:
    image, mask = encode(picture(1)), encode(square_mask())
    kontext = backend("tiny-flux-kontext", data_dir)
    masked = kontext.unsupported(params("tiny-flux-kontext", images=(image,), mask=mask))
    assert (
        masked is not None
        and "flux-kontext models do not take an input image with a mask" in masked
    )
    strength = kontext.unsupported(params("tiny-flux-kontext", images=(image,), strength=0.5))
    assert strength is not None and "leave strength unset" in strength
    fill = backend("tiny-flux-fill", data_dir).unsupported(params("tiny-flux-fill"))
    assert fill is not None and "take an input image with a mask" in fill
    sdxl = backend("tiny-sdxl", data_dir)
    for request in (
        params("tiny-sdxl"),
        params("tiny-sdxl", images=(image,)),
        params("tiny-sdxl", images=(image,), mask=mask),
        # LoRA adapters are for models.local.loras to apply, not a reason to refuse.
        params("tiny-sdxl", loras=(LoraRef(name="style", weight=0.8, sha256="0" * 64),)),
    ):
        assert sdxl.unsupported(request) is None


# -- the backend's checks ----------------------------------------------------------------------


def test_resolve_fills_the_familys_strength_and_checks_it(data_dir: Path) -> None:
    sdxl = backend("tiny-sdxl", data_dir)
    image = encode(picture(1))
    assert sdxl.resolve(params("tiny-sdxl", images=(image,))).strength == 0.75
    assert sdxl.resolve(params("tiny-sdxl")).strength is None  # text-to-image takes none
    inpaint = backend("tiny-sdxl-inpaint", data_dir)
    request = params("tiny-sdxl-inpaint", images=(image,), mask=encode(square_mask()))
    assert inpaint.resolve(request).strength == 0.99
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InvalidParamsError, match="strength must be above 0") as info:
            sdxl.resolve(params("tiny-sdxl", images=(image,), strength=bad))
        assert info.value.param == "strength"
    with pytest.raises(InvalidParamsError, match="runs no denoising step") as info:
        sdxl.resolve(params("tiny-sdxl", images=(image,), strength=0.1, steps=4))
    assert info.value.param == "strength"


def test_resolve_checks_the_input_sizes(data_dir: Path) -> None:
    sdxl = backend("tiny-sdxl", data_dir)
    small = encode(picture(1, 48, 48))
    with pytest.raises(
        InvalidParamsError, match="image is 48x48 but the request's size is 64x64"
    ) as info:
        sdxl.resolve(params("tiny-sdxl", images=(small,)))
    assert info.value.param == "image"
    with pytest.raises(InvalidParamsError, match="mask is 48x48 but the image is 64x64") as info:
        sdxl.resolve(params("tiny-sdxl", images=(encode(picture(1)),), mask=small))
    assert info.value.param == "mask"
    # "Only masked" works on the image at its own size.
    masked = params(
        "tiny-sdxl", images=(small,), mask=encode(square_mask(48, 48)), inpaint_area="masked"
    )
    assert sdxl.resolve(masked).width == SIZE


def test_identity_names_each_tasks_pipeline(data_dir: Path) -> None:
    image, mask = encode(picture(1)), encode(square_mask())
    for model, names in (
        (
            "tiny-sdxl",
            [
                "StableDiffusionXLPipeline",
                "StableDiffusionXLImg2ImgPipeline",
                "StableDiffusionXLInpaintPipeline",
            ],
        ),
        ("tiny-flux", ["FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"]),
    ):
        b = backend(model, data_dir)
        got = [
            b.identity(params(model, **fields)).pipeline
            for fields in ({}, {"images": (image,)}, {"images": (image,), "mask": mask})
        ]
        assert got == names
