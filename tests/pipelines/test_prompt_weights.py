"""A1111 prompt weighting on the real tiny pipelines: `(word:1.0)` is `word` to the byte,
weights and BREAK change the pixels, an escaped bracket is literal text, weighted and plain
requests batched together give their solo pixels, a BREAK part over the limit is refused, and
Flux runs the text without the syntax and reports the weighting dropped."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.base import GenerationParams
from models.catalogue import Catalogue
from models.local import weighted_embeds
from models.local.pipeline import PipelineRunner, RuntimeOptions, _to_uint8
from models.local.worker import batch_key
from server import errors
from server.service import ImageRequest, ImageService
from server.settings import Settings

PLAIN = "a lighthouse at dusk"


class Rig:
    def __init__(self, data_dir: Path, model: str) -> None:
        spec = Catalogue.load([]).get(model)
        assert spec is not None
        self.model = model
        self.runner = PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions())

    def params(
        self, prompt: str, *, seed: int = 3, negative: str | None = None
    ) -> GenerationParams:
        return GenerationParams(
            prompt=prompt,
            negative_prompt=negative,
            model=self.model,
            width=32,
            height=32,
            n=1,
            seed=seed,
            steps=2,
            guidance_scale=3.5,
            scheduler=self.runner.family.default_scheduler,
        )

    def png(self, prompt: str, *, seed: int = 3, negative: str | None = None) -> bytes:
        params = self.params(prompt, seed=seed, negative=negative)
        return self.runner.run_batch([params]).images[0][0].data


@pytest.fixture
def sdxl(data_dir: Path) -> Rig:
    return Rig(data_dir, "tiny-sdxl")


def test_unit_weight_is_the_plain_prompt_to_the_byte(sdxl: Rig) -> None:
    plain = sdxl.png(PLAIN)
    assert sdxl.png("a (lighthouse:1.0) at dusk") == plain
    assert sdxl.png("a lighthouse at dusk BREAK") == plain
    assert sdxl.png(PLAIN, negative="(blurry:1)") == sdxl.png(PLAIN, negative="blurry")


def test_weights_and_break_change_the_pixels(sdxl: Rig) -> None:
    results = {
        text: sdxl.png(text)
        for text in (
            PLAIN,
            "a (lighthouse:1.5) at dusk",
            "a [lighthouse] at dusk",
            "a (lighthouse) at dusk",
            "a lighthouse BREAK at dusk",
        )
    }
    assert len(set(results.values())) == len(results)
    assert sdxl.png(PLAIN, negative="[blurry]") != sdxl.png(PLAIN, negative="blurry")


def test_escaped_brackets_are_literal_text(sdxl: Rig) -> None:
    """`\\(lighthouse\\)` runs as the text "(lighthouse)", brackets and all: the pixels of
    diffusers given that text directly."""
    got = sdxl.runner.run_batch([sdxl.params(r"a \(lighthouse\) at dusk")]).images[0][0]
    import torch

    pipe = sdxl.runner.pipeline_for("txt2img")
    with torch.inference_mode():
        out = pipe(
            prompt=["a (lighthouse) at dusk"],
            num_inference_steps=2,
            guidance_scale=3.5,
            generator=[torch.Generator("cpu").manual_seed(3)],
            output_type="np",
            width=32,
            height=32,
        )
    expected, _ = _to_uint8(out.images[0])
    assert (got.pixels == expected).all()
    assert got.data != sdxl.png("a lighthouse at dusk")


@pytest.mark.parametrize(
    ("prompts", "negative"),
    [
        # A plain prompt in a call that runs embeddings: its own are diffusers' to the byte.
        (["a (lighthouse:1.4) at dusk", PLAIN, "[a] lighthouse"], None),
        (["(lighthouse:1.4) at dusk", PLAIN], "[blurry], (grainy:1.2)"),
        (["a lighthouse BREAK (dusk:1.3)", "BREAK a lighthouse"], None),
    ],
)
def test_batched_requests_give_their_solo_pixels(
    sdxl: Rig, prompts: list[str], negative: str | None
) -> None:
    """Within 1 of 255, the tolerance of every batched-vs-alone test here: the embeddings are
    the same to the bit (the next test), the UNet's float sums at another batch size are not."""
    batch = [sdxl.params(p, seed=10 + i, negative=negative) for i, p in enumerate(prompts)]
    assert len({batch_key(p) for p in batch}) == 1
    together = sdxl.runner.run_batch(batch).images
    for params, row in zip(batch, together, strict=True):
        alone = sdxl.runner.run_batch([params]).images[0][0].pixels
        assert np.abs(alone.astype(int) - row[0].pixels.astype(int)).max() <= 1


def test_embeddings_are_diffusers_for_plain_text_and_batch_free(sdxl: Rig) -> None:
    """A plain prompt in a weighted call gets diffusers' own embeddings, to the bit, and a
    weighted prompt's do not depend on what it is batched with."""
    import torch

    pipe = sdxl.runner.pipeline_for("txt2img")
    weighted, negative = "a (lighthouse:1.4) at dusk", "[blurry]"
    family = sdxl.runner.family
    with torch.inference_mode():
        both = weighted_embeds.prompt_kwargs(pipe, family, [weighted, PLAIN], [negative, "x"])
        alone = weighted_embeds.prompt_kwargs(pipe, family, [weighted], [negative])
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=PLAIN, negative_prompt="x", device="cpu", do_classifier_free_guidance=True
        )
    assert torch.equal(both["prompt_embeds"][1:], embeds)
    assert torch.equal(both["pooled_prompt_embeds"][1:], pooled)
    assert torch.equal(both["negative_prompt_embeds"][1:], negative_embeds)
    assert torch.equal(both["negative_pooled_prompt_embeds"][1:], negative_pooled)
    for name, value in alone.items():
        assert torch.equal(both[name][:1], value), name
    assert not torch.equal(both["prompt_embeds"][:1], embeds)


def test_break_chunk_count_is_in_the_batch_key(sdxl: Rig) -> None:
    """Embeddings of one call share a length, so a 2-chunk prompt never joins a 1-chunk one."""
    assert batch_key(sdxl.params("a BREAK b")) != batch_key(sdxl.params(PLAIN))
    assert batch_key(sdxl.params("a BREAK b", negative="n")) == batch_key(
        sdxl.params("x", negative="y BREAK z")
    )


@pytest.fixture
def service(settings: Settings) -> Iterator[ImageService]:
    svc = ImageService(settings)
    yield svc
    svc.close()


def test_each_break_part_has_the_token_limit(service: ImageService) -> None:
    """The tiny CLIP takes 254 tokens (one per character): 200 + 200 split by BREAK fit,
    401 in one part do not, and the message names the part."""
    part = "x" * 200
    request = ImageRequest(prompt=f"{part} BREAK {part}", model="tiny-sdxl", seed=1, steps=2)
    assert len(asyncio.run(service.generate(request)).images) == 1
    long = ImageRequest(prompt=f"a BREAK ({'x' * 300}:1.2)", model="tiny-sdxl", seed=1, steps=2)
    with pytest.raises(errors.InvalidRequestError) as info:
        asyncio.run(service.generate(long))
    assert info.value.param == "prompt"
    assert "prompt part 2" in info.value.message and "at most 254" in info.value.message


def test_flux_runs_the_text_and_reports_the_weighting_dropped(service: ImageService) -> None:
    """Pixels compared: the PNG's metadata carries each request's own prompt."""

    def run(prompt: str) -> tuple[bytes, tuple[str, ...]]:
        request = ImageRequest(
            prompt=prompt, model="tiny-flux", seed=5, steps=2, width=32, height=32
        )
        result = asyncio.run(service.generate(request))
        pixels = Image.open(io.BytesIO(result.images[0].data)).convert("RGB").tobytes()
        return pixels, result.dropped_params

    plain, plain_dropped = run(PLAIN)
    weighted, dropped = run("a (lighthouse:1.5) BREAK at [dusk]")
    assert weighted == plain
    assert "prompt weighting" in dropped and "prompt weighting" not in plain_dropped
    # (word:1.0) changes nothing, so nothing is dropped.
    assert run("a (lighthouse:1.0) at dusk") == (plain, plain_dropped)
