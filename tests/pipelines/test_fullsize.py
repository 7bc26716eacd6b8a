"""Full-size architectures with random weights (models.local.fullsize, the `random:<arch>`
source): the published parameter counts reproduced on the meta device, the whole pipeline built
there, the source's resolution and revision, and one real run through a PipelineRunner on a
shrunken copy of a data file. A full-size build needs a GPU (tests/gpu)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.base import GenerationParams, ModelUnavailableError
from models.catalogue import Catalogue
from models.local import fullsize, sources
from models.local.pipeline import PipelineRunner, RuntimeOptions

torch = pytest.importorskip("torch")

# The published weights' parameter counts (the tensors of each component's safetensors files,
# T5's shared token embedding once), as the data files state them too.
PUBLISHED = {
    "sdxl-base-1.0": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,  # CLIP ViT-L/14 text model
        "text_encoder_2": 694_659_840,  # OpenCLIP bigG text model with its projection
    },
    "flux.1-dev": {
        "transformer": 11_901_408_320,
        "vae": 83_819_683,
        "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,  # T5 v1.1 XXL, encoder only
    },
}
PIPELINES = {"sdxl-base-1.0": "StableDiffusionXLPipeline", "flux.1-dev": "FluxPipeline"}


def test_the_data_files_are_the_known_architectures() -> None:
    assert fullsize.architectures() == tuple(sorted(PUBLISHED))
    for arch in PUBLISHED:
        data = fullsize.load_architecture(arch)
        assert data["_retrieved"] == "2026-12-02"
        assert data["_source"]["repo"] in {
            "stabilityai/stable-diffusion-xl-base-1.0",
            "black-forest-labs/FLUX.1-dev",
        }
        stated = {n: c["parameters"] for n, c in data["components"].items() if "parameters" in c}
        assert stated == PUBLISHED[arch]


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_figures(arch: str) -> None:
    measured = fullsize.parameter_counts(arch)
    assert measured.keys() == PUBLISHED[arch].keys()
    for name, published in PUBLISHED[arch].items():
        assert measured[name] == pytest.approx(published, rel=1e-3), name


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_the_whole_pipeline_builds_on_the_meta_device(arch: str) -> None:
    pipe = fullsize.build_pipeline(arch, device="meta", dtype=torch.bfloat16)
    assert type(pipe).__name__ == PIPELINES[arch]
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            assert component.device.type == "meta", name
            assert component.dtype == torch.bfloat16, name
            assert not component.training, name
    published = fullsize.load_architecture(arch)["components"]
    # The real limits and vocabularies; the tiny tokenizers' special-token ids.
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.vocab_size == 49408
    second_limit = 512 if arch == "flux.1-dev" else 77
    assert pipe.tokenizer_2.model_max_length == second_limit
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        config = getattr(pipe, encoder).config
        tok = getattr(pipe, tokenizer)
        assert config.vocab_size == published[encoder]["config"]["vocab_size"]
        assert config.eos_token_id == tok.eos_token_id
        assert config.pad_token_id == tok.pad_token_id
    assert type(pipe.scheduler).__name__ == published["scheduler"]["class"]
    for key, value in published["scheduler"]["config"].items():
        assert pipe.scheduler.config[key] == value, key


def test_a_component_is_seeded_and_made_in_its_dtype() -> None:
    first = fullsize.build_component("sdxl-base-1.0", "vae", device="cpu", dtype=torch.bfloat16)
    second = fullsize.build_component("sdxl-base-1.0", "vae", device="cpu", dtype=torch.bfloat16)
    assert first.dtype == torch.bfloat16 and not first.training
    assert torch.get_default_dtype() == torch.float32  # restored after the build
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_sources_resolve_without_the_network(tmp_path: Path) -> None:
    source = "random:sdxl-base-1.0"
    assert sources.classify(source) == "random"
    resolved = sources.resolve(source, data_dir=tmp_path)
    assert resolved.kind == "random"
    assert resolved.path == fullsize.ARCHITECTURE_DIR / "sdxl-base-1.0.json"
    assert resolved.revision.startswith("random:sdxl-base-1.0:")
    assert resolved.revision == sources.resolve(source, data_dir=tmp_path).revision
    found = sources.availability(source, data_dir=tmp_path)
    assert found.available and found.on_disk and found.builtin and found.reason is None
    assert list(tmp_path.iterdir()) == []  # nothing built, hashed or remembered


def test_an_unknown_architecture_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="unknown random architecture 'sdxl-huge'") as e:
        sources.resolve("random:sdxl-huge", data_dir=tmp_path)
    assert "flux.1-dev" in e.value.message and "sdxl-base-1.0" in e.value.message
    found = sources.availability("random:sdxl-huge", data_dir=tmp_path)
    assert not found.available and found.reason is not None and "sdxl-base-1.0" in found.reason


def test_a_changed_config_changes_the_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "architectures"
    shutil.copytree(fullsize.ARCHITECTURE_DIR, copy)
    monkeypatch.setattr(fullsize, "ARCHITECTURE_DIR", copy)
    before = sources.resolve("random:sdxl-base-1.0", data_dir=tmp_path).revision
    file = copy / "sdxl-base-1.0.json"
    data = json.loads(file.read_text())
    data["components"]["unet"]["config"]["transformer_layers_per_block"] = [1, 2, 12]
    file.write_text(json.dumps(data))
    after = sources.resolve("random:sdxl-base-1.0", data_dir=tmp_path).revision
    assert after.startswith("random:sdxl-base-1.0:") and after != before
    # The other architecture's revision is its own file's.
    flux = sources.resolve("random:flux.1-dev", data_dir=tmp_path).revision
    assert flux == fullsize.revision("flux.1-dev")


@pytest.mark.parametrize(
    ("kind", "arch", "limit"), [("sdxl", "sdxl-base-1.0", 75), ("flux", "flux.1-dev", 511)]
)
def test_a_runner_reads_the_tokenizer_and_scheduler_from_the_data_file(
    data_dir: Path, kind: str, arch: str, limit: int
) -> None:
    runner = _runner(kind, arch, data_dir)
    assert runner.max_prompt_tokens == limit
    published = fullsize.load_architecture(arch)["components"]["scheduler"]["config"]
    assert runner.shipped_scheduler_config() == published
    assert runner.pipe is None  # neither needs the weights


# Shrunken copies of the published configs (the sizes of models.local.tiny's pipelines): the
# same data-file format, small enough to run on a CPU in a second.
_SMALL_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "vocab_size": 600,
}
_SMALL = {
    "sdxl-base-1.0": {
        "unet": {
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "sample_size": 32,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [2, 4],
            "transformer_layers_per_block": [1, 1],
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 80,  # 6 time ids * 8 + 32 pooled
            "cross_attention_dim": 64,
            "norm_num_groups": 8,
        },
        "vae": {
            "block_out_channels": [16, 32],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "norm_num_groups": 8,
            "sample_size": 64,
        },
        "text_encoder": _SMALL_CLIP,
        "text_encoder_2": _SMALL_CLIP,
    },
    "flux.1-dev": {
        "transformer": {
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": [4, 4, 8],
        },
        "vae": {
            "block_out_channels": [4],
            "down_block_types": ["DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D"],
            "layers_per_block": 1,
            "latent_channels": 1,
            "norm_num_groups": 1,
            "sample_size": 32,
        },
        "text_encoder": _SMALL_CLIP,
        "text_encoder_2": {
            "vocab_size": 200,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 37,
            "num_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
        },
    },
}


@pytest.mark.parametrize(("kind", "arch"), [("sdxl", "sdxl-base-1.0"), ("flux", "flux.1-dev")])
def test_a_runner_makes_images_from_a_random_source(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, arch: str
) -> None:
    folder = tmp_path / "architectures"
    folder.mkdir()
    data = fullsize.load_architecture(arch)
    for name, overrides in _SMALL[arch].items():
        data["components"][name]["config"].update(overrides)
    (folder / f"{arch}.json").write_text(json.dumps(data))
    monkeypatch.setattr(fullsize, "ARCHITECTURE_DIR", folder)
    runner = _runner(kind, arch, data_dir)
    params = GenerationParams(
        prompt="a fox", model="random", width=64, height=64, n=1, seed=1, steps=1
    )
    out = runner.run_batch([params])
    image = out.images[0][0]
    assert (image.width, image.height) == (64, 64)
    assert image.pixels.shape == (64, 64, 3) and not image.warnings
    assert runner.resolve_source().revision == fullsize.revision(arch)
    # The same seed on the same build gives the same weights, so the same pixels.
    again = _runner(kind, arch, data_dir).run_batch([params]).images[0][0]
    assert np.array_equal(again.pixels, image.pixels)


def _runner(kind: str, arch: str, data_dir: Path) -> PipelineRunner:
    entry: dict[str, Any] = {"name": "random", "kind": kind, "source": f"random:{arch}"}
    spec = Catalogue.load([entry]).specs["random"]
    return PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions(device="cpu"))


@pytest.mark.parametrize(("kind", "arch"), [("sdxl", "sdxl-base-1.0"), ("flux", "flux.1-dev")])
def test_a_runner_expects_the_published_parameters_before_it_builds(
    kind: str, arch: str, data_dir: Path
) -> None:
    """What residency makes room for before a first load (float32 on the CPU); nothing is
    built to know it."""
    runner = _runner(kind, arch, data_dir)
    counts = fullsize.parameter_counts(arch)
    assert runner.expected_bytes() == sum(counts.values()) * 4
    assert runner.pipe is None
