"""The production path end to end on the real tiny diffusers pipelines: seeds, cache, cost,
ledger, sanitizer, quality check."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.base import NO_EVENTS, Backend
from models.catalogue import Catalogue
from server import errors
from server.cache import object_key
from server.registry import BackendRegistry
from server.service import GenerationResult, ImageRequest, ImageService
from server.settings import Settings


@pytest.fixture
def service(settings: Settings) -> Iterator[ImageService]:
    svc = ImageService(settings)
    yield svc
    svc.close()


def run(service: ImageService, **fields: Any) -> GenerationResult:
    fields.setdefault("steps", 2)
    return asyncio.run(service.generate(ImageRequest(**fields)))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_generates_png_of_requested_size(service: ImageService, model: str) -> None:
    result = run(service, prompt="a red fox", model=model, width=96, height=64, seed=1)
    assert len(result.images) == 1
    img = Image.open(io.BytesIO(result.images[0].data))
    assert img.format == "PNG"
    assert img.size == (96, 64)
    assert result.provider == "local"
    assert result.gpu_seconds > 0
    assert result.cost_usd == pytest.approx(result.gpu_seconds * service.usd_per_gpu_hour / 3600)


def test_same_seed_twice_is_a_cache_hit_with_identical_bytes(service: ImageService) -> None:
    first = run(service, prompt="a lighthouse", seed=42)
    second = run(service, prompt="a lighthouse", seed=42)
    assert not first.cached
    assert second.cached
    assert second.cost_usd == 0.0
    assert second.gpu_seconds == 0.0
    assert second.saved_usd == pytest.approx(first.cost_usd)
    assert [i.data for i in second.images] == [i.data for i in first.images]
    assert second.cache_key == first.cache_key


@pytest.mark.parametrize(
    "change",
    [
        {"steps": 3},
        {"guidance_scale": 7.0},
        {"width": 72},
        {"scheduler": "ddim"},
        {"negative_prompt": "fog"},
        {"model": "tiny-flux"},
        {"n": 2},
    ],
    ids=lambda c: next(iter(c)),
)
def test_changing_any_pixel_field_is_a_miss(service: ImageService, change: dict[str, Any]) -> None:
    base = {"prompt": "a lighthouse", "seed": 5, "model": "tiny-sdxl", "steps": 2}
    first = run(service, **base)
    assert not first.cached
    changed = run(service, **{**base, **change})
    assert not changed.cached
    assert changed.cache_key != first.cache_key


def test_no_seed_gets_concrete_different_seeds_never_from_cache(service: ImageService) -> None:
    a = run(service, prompt="a lighthouse")
    b = run(service, prompt="a lighthouse")
    assert not a.cached and not b.cached
    assert isinstance(a.params.seed, int) and isinstance(b.params.seed, int)
    assert a.params.seed != b.params.seed
    # Stored under the seed it got: repeating it with that seed is a hit.
    again = run(service, prompt="a lighthouse", seed=a.params.seed)
    assert again.cached
    assert again.images[0].data == a.images[0].data


def test_n2_gives_consecutive_seeds_and_each_image_reproduces_alone(
    service: ImageService,
) -> None:
    pair = run(service, prompt="a harbour at dusk", n=2, seed=7)
    assert [i.seed for i in pair.images] == [7, 8]
    solo = run(service, prompt="a harbour at dusk", n=1, seed=8)
    diff = np.abs(pixels(pair.images[1].data) - pixels(solo.images[0].data)).max()
    assert diff <= 1
    # And the two images of the pair really differ.
    assert np.abs(pixels(pair.images[0].data) - pixels(pair.images[1].data)).max() > 10


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_negative_prompt_changes_the_image(service: ImageService, model: str) -> None:
    plain = run(service, prompt="a castle", seed=3, model=model)
    negative = run(service, prompt="a castle", seed=3, model=model, negative_prompt="towers")
    assert np.abs(pixels(plain.images[0].data) - pixels(negative.images[0].data)).max() > 0


@pytest.mark.parametrize(
    "prompt", ["a nude figure", "n u d e", "n.u.d.e", "nud3 statue", "extreme g0re"]
)
def test_blocked_prompt_fails_before_any_model_loads(service: ImageService, prompt: str) -> None:
    with pytest.raises(errors.PromptBlockedError) as info:
        run(service, prompt=prompt, seed=1)
    assert info.value.param == "prompt"
    assert "category" in info.value.message
    assert not any(row["loaded"] for row in service.models())
    assert service.ledger.stats()["requests"] == 0


@pytest.mark.parametrize(
    "prompt", ["the naked eye", "a non-violence march", "Al Gore at a podium", "gorgeous sky"]
)
def test_allow_listed_phrases_generate(service: ImageService, prompt: str) -> None:
    result = run(service, prompt=prompt, seed=2)
    assert len(result.images) == 1


def test_negative_prompt_is_never_blocked(service: ImageService) -> None:
    result = run(service, prompt="a portrait", negative_prompt="nude, gore", seed=2)
    assert result.negative_prompt == "nude, gore"


def test_corrupted_cache_file_is_detected_and_regenerated(service: ImageService) -> None:
    first = run(service, prompt="a windmill", seed=11)
    sha = first.images[0].sha256
    path = service.settings.cache_dir / object_key(sha)
    path.write_bytes(path.read_bytes()[:-20] + b"\0" * 20)
    service.cache.recent.discard(sha)  # as in a fresh process: the read goes to the file
    again = run(service, prompt="a windmill", seed=11)
    assert not again.cached  # never served from a damaged file
    assert again.images[0].data == first.images[0].data
    assert run(service, prompt="a windmill", seed=11).cached


def test_prompt_over_the_model_limit_is_rejected_with_the_limit(service: ImageService) -> None:
    with pytest.raises(errors.InvalidRequestError) as info:
        run(service, prompt="x" * 400, seed=1)
    assert info.value.param == "prompt"
    assert "at most 254" in info.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"width": 70}, "size"),
        ({"n": 11}, "n"),
        ({"scheduler": "warp"}, "scheduler"),
        ({"steps": 0}, "steps"),
        ({"model": "no-such-model"}, "model"),
        ({"preset": "no-such-preset"}, "preset"),
    ],
)
def test_bad_input_names_the_field(
    service: ImageService, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(errors.ImagegenError) as info:
        run(service, prompt="a boat", seed=1, **fields)
    assert info.value.param == param
    assert service.ledger.stats()["requests"] == 0


def test_ledger_rows_and_stats(service: ImageService) -> None:
    first = run(service, prompt="a kite", seed=9)
    run(service, prompt="a kite", seed=9)
    stats = service.stats()
    assert stats["requests"] == 2
    assert stats["cached"] == 1
    assert stats["cost_usd"] == pytest.approx(first.cost_usd)
    assert stats["saved_usd"] == pytest.approx(first.cost_usd)


def test_preset_expands_prompt_and_keys_the_cache(service: ImageService) -> None:
    plain = run(service, prompt="a chair", seed=4)
    preset = run(service, prompt="a chair", seed=4, preset="product-photo")
    assert "studio lighting" in preset.revised_prompt
    assert preset.negative_prompt
    assert preset.cache_key != plain.cache_key


def test_png_carries_parameters_and_reproduces(service: ImageService) -> None:
    from server import pngmeta
    from server.generate_cmd import request_from_image

    result = run(service, prompt="a teapot", seed=21, negative_prompt="steam")
    text, record = pngmeta.read(result.images[0].data)
    assert text is not None and "Seed: 21" in text and "Negative prompt: steam" in text
    assert record is not None and record["seed"] == 21
    path = Path(service.settings.data_dir) / "teapot.png"
    path.write_bytes(result.images[0].data)
    again = asyncio.run(service.generate(request_from_image(path)))
    assert again.images[0].data == result.images[0].data


class _BlackFrames:
    """Forces the fp16-VAE failure: black frames until asked for the precise mode."""

    def __init__(self, inner: Any, fix_on_retry: bool) -> None:
        self.inner = inner
        self.fix_on_retry = fix_on_retry
        self.calls: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, params: Any, events: Any = NO_EVENTS, *, precise: bool = False) -> Any:
        self.calls.append(precise)
        result = await self.inner.generate(params, events, precise=precise)
        if precise and self.fix_on_retry:
            return result
        frame = Image.new("RGB", (params.width, params.height))
        buf = io.BytesIO()
        frame.save(buf, format="PNG")
        # Like the local pipeline, hand over the pixels with the file.
        black = dataclasses.replace(result.images[0], data=buf.getvalue(), pixels=np.asarray(frame))
        return dataclasses.replace(result, images=(black,))


@pytest.mark.parametrize("fix_on_retry", [True, False])
def test_black_frame_retries_once_with_precise_vae(settings: Settings, fix_on_retry: bool) -> None:
    fakes: list[_BlackFrames] = []

    def black_frames(real: Backend) -> Backend:
        fakes.append(_BlackFrames(real, fix_on_retry))
        return fakes[-1]  # type: ignore[return-value]

    catalogue = Catalogue.load(settings.models)
    forced = ImageService(
        settings, registry=BackendRegistry(settings, catalogue, wrap=black_frames)
    )
    try:
        if fix_on_retry:
            result = run(forced, prompt="a road", seed=6)
            assert result.images[0].quality["ok"] is True
        else:
            with pytest.raises(errors.GenerationFailedError, match="all-black") as failed:
                run(forced, prompt="a road", seed=6, request_id="img_blackframes")
            # The failure is booked (device time was spent) under the request's own id.
            (row,) = [r for r in forced.ledger.rows() if r["status"] == "failed"]
            assert row["request_id"] == "img_blackframes"
            assert "all-black" in failed.value.message
    finally:
        forced.close()
    assert fakes[0].calls == [False, True]
    if not fix_on_retry:
        # Never cached: the same request on the real backend misses the cache and runs.
        service = ImageService(settings)
        try:
            assert not run(service, prompt="a road", seed=6).cached
        finally:
            service.close()
