"""Image inputs through the one production path on the real tiny pipelines: decode at the
edge, cache key, PNG metadata, unsupported models, the quality check's size in masked mode."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server import errors, pngmeta
from server.request import LoraRequest
from server.service import GenerationResult, ImageRequest, ImageService
from server.settings import Settings


@pytest.fixture
def service(settings: Settings) -> Iterator[ImageService]:
    svc = ImageService(settings)
    yield svc
    svc.close()


def run(service: ImageService, **fields: Any) -> GenerationResult:
    fields.setdefault("steps", 2)
    fields.setdefault("prompt", "a harbour at dawn")
    return asyncio.run(service.generate(ImageRequest(**fields)))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def photo(width: int = 64, height: int = 64, shift: int = 0) -> bytes:
    rng = np.random.default_rng(shift)
    return png(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))


def square_mask(width: int = 64, height: int = 64) -> bytes:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (16, 16, 48, 48))
    return png(mask)


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_an_edit_twice_is_a_cache_hit_and_a_new_image_or_mask_a_miss(
    service: ImageService,
) -> None:
    image = photo()
    first = run(service, images=(image,), seed=3, strength=0.6)
    again = run(service, images=(image,), seed=3, strength=0.6)
    assert not first.cached and again.cached
    assert [i.data for i in again.images] == [i.data for i in first.images]
    assert not run(service, images=(photo(shift=1),), seed=3, strength=0.6).cached
    assert not run(service, images=(image,), mask=square_mask(), seed=3, strength=0.6).cached


def test_a_local_model_uses_the_first_image_and_says_it_dropped_the_rest(
    service: ImageService,
) -> None:
    one = run(service, images=(photo(),), seed=8)
    two = run(service, images=(photo(), photo(shift=2)), seed=8)
    assert "image[1:]" in two.dropped_params and "image[1:]" not in one.dropped_params
    assert rgb(two.images[0].data).tolist() == rgb(one.images[0].data).tolist()


def test_the_size_comes_from_the_image_without_a_requested_size(service: ImageService) -> None:
    result = run(service, images=(photo(80, 48),), seed=1)
    assert (result.images[0].width, result.images[0].height) == (80, 48)


def test_png_metadata_records_the_edit(service: ImageService) -> None:
    result = run(service, images=(photo(),), mask=square_mask(), seed=4, strength=0.5)
    text, record = pngmeta.read(result.images[0].data)
    assert text is not None and "Denoising strength: 0.5" in text and "Mask blur: 0" in text
    assert record is not None
    inputs = record["request"]["inputs"]  # type: ignore[index]
    assert inputs["strength"] == 0.5 and inputs["task"] == "inpaint"
    assert len(inputs["images"][0]) == 64 and len(inputs["mask"]) == 64


def test_inpainting_keeps_every_pixel_outside_the_mask(service: ImageService) -> None:
    image = photo()
    result = run(service, images=(image,), mask=square_mask(), seed=2, strength=1.0)
    before, after = rgb(image), rgb(result.images[0].data)
    outside = np.ones((64, 64), dtype=bool)
    outside[16:48, 16:48] = False
    assert (before[outside] == after[outside]).all()
    assert (before[~outside] != after[~outside]).any()


def test_masked_mode_returns_the_input_size_and_passes_the_quality_check(
    service: ImageService,
) -> None:
    mask = Image.new("L", (128, 96), 0)
    mask.paste(255, (8, 8, 24, 24))
    result = run(
        service,
        images=(photo(128, 96),),
        mask=png(mask),
        inpaint_area="masked",
        width=64,
        height=64,
        seed=5,
    )
    assert (result.images[0].width, result.images[0].height) == (128, 96)
    assert result.images[0].quality.get("ok", True)


def test_a_bad_upload_fails_before_any_model_work(service: ImageService) -> None:
    with pytest.raises(errors.InvalidRequestError) as caught:
        run(service, images=(b"not an image",), seed=1)
    assert caught.value.param == "image"
    with pytest.raises(errors.InvalidRequestError) as caught:
        run(service, images=(photo(),), mask=square_mask(32, 32), seed=1)
    assert caught.value.param == "mask"
    assert service.stats()["requests"] == 0  # no ledger row for work that did not happen


@pytest.fixture
def lora_service(data_dir: Any) -> Iterator[ImageService]:
    from models.local.tiny_loras import build_tiny_loras

    build_tiny_loras(data_dir / "loras")
    svc = ImageService(Settings(data_dir=data_dir))
    yield svc
    svc.close()


def test_a_lora_in_the_prompt_keys_the_cache_and_is_recorded(lora_service: ImageService) -> None:
    tagged = run(lora_service, prompt="a harbour <lora:tiny-sdxl-a:0.8>", seed=6)
    field = run(
        lora_service,
        prompt="a harbour",
        loras=(LoraRequest("tiny-sdxl-a", 0.8),),
        seed=6,
    )
    plain = run(lora_service, prompt="a harbour", seed=6)
    assert tagged.params.prompt == "a harbour" and tagged.params.loras[0].weight == 0.8
    assert field.cached and field.cache_key == tagged.cache_key  # the same request, two spellings
    assert not plain.cached and plain.cache_key != tagged.cache_key
    text, record = pngmeta.read(tagged.images[0].data)
    sha = lora_service.lora_library.find("tiny-sdxl-a").sha256
    assert text is not None and "<lora:tiny-sdxl-a:0.8>" in text and sha[:12] in text
    assert record is not None and record["request"]["loras"] == [["tiny-sdxl-a", sha, 0.8]]  # type: ignore[index]


def test_lora_errors_name_the_field(lora_service: ImageService) -> None:
    for prompt, fragment in (
        ("x <lora:nope:1>", "not in the LoRA library"),
        ("x <lora:../etc:1>", "../etc"),
        ("x <lora:sd15-kohya:1>", "sd15"),
    ):
        with pytest.raises(errors.InvalidRequestError) as caught:
            run(lora_service, prompt=prompt, seed=1)
        assert caught.value.param == "loras", (prompt, caught.value.message)
        assert fragment in caught.value.message, caught.value.message
    with pytest.raises(errors.InvalidRequestError) as caught:
        # A hosted model that is not a client alias (gpt-image-2 with no OpenAI key is one).
        run(lora_service, prompt="x <lora:tiny-sdxl-a:1>", model="flux-pro-1.1", seed=1)
    assert caught.value.param == "loras", caught.value.message
    assert "local models" in caught.value.message
    assert lora_service.stats()["requests"] == 0
