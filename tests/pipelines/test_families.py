"""The family table (models.local.families) against what it describes: the real tiny pipelines
and tokenizers, the catalogue's kinds and defaults, and the backend checks that read it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.base import LOCAL_KINDS, GenerationParams, InvalidParamsError, ModelUnavailableError
from models.catalogue import Catalogue
from models.local import families
from models.local.backend import DiffusersBackend
from models.local.families import FAMILIES
from models.local.pipeline import PipelineRunner, RuntimeOptions
from models.local.worker import DeviceWorker

TINY = {
    "sdxl": "tiny-sdxl",
    "sdxl-inpaint": "tiny-sdxl-inpaint",
    "flux": "tiny-flux",
    "flux-kontext": "tiny-flux-kontext",
    "flux-fill": "tiny-flux-fill",
}


def test_local_kinds_are_the_tables_families() -> None:
    assert frozenset(FAMILIES) == LOCAL_KINDS
    assert set(TINY) == set(FAMILIES)  # every family has a tiny model that tests it
    for kind, family in FAMILIES.items():
        assert family.kind == kind
        assert family.loads in family.pipelines
        assert set(family.default_strength) <= set(family.pipelines)
        assert family.base in FAMILIES and FAMILIES[family.base].base == family.base


def test_an_unknown_kind_names_the_local_ones() -> None:
    with pytest.raises(
        ModelUnavailableError, match="local kinds are sdxl, sdxl-inpaint, flux, flux-kontext"
    ):
        families.family("openai")


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_every_named_class_exists(kind: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    family = FAMILIES[kind]
    for name in family.pipelines.values():
        assert hasattr(diffusers, name), name
    for choice in family.schedulers.values():
        assert hasattr(diffusers, choice.class_name), choice.class_name
    assert hasattr(transformers, family.prompt_tokenizer.class_name)
    assert family.default_scheduler in family.schedulers


def test_catalogue_defaults_use_their_familys_schedulers() -> None:
    for spec in Catalogue.load().specs.values():
        if spec.is_local and spec.defaults.scheduler is not None:
            assert spec.defaults.scheduler in families.family(spec.kind).schedulers, spec.name


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_the_table_matches_the_real_pipeline(kind: str, data_dir: Path) -> None:
    """Pipeline class, denoiser, sequence-length tokenizer and the special tokens the prompt
    tokenizer adds, read off a loaded tiny pipeline."""
    family = FAMILIES[kind]
    spec = Catalogue.load().specs[TINY[kind]]
    runner = PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions())
    runner.load()
    pipe = runner.pipe
    assert type(pipe).__name__ == family.pipeline() == runner.pipeline_name()
    assert getattr(pipe, family.denoiser) is not None
    if family.sequence_length_from is not None:
        assert getattr(pipe, family.sequence_length_from).model_max_length > 0
    tok = runner.tokenizer()
    transformers = pytest.importorskip("transformers")
    # isinstance: transformers 5 makes T5TokenizerFast another name of T5Tokenizer.
    assert isinstance(tok, getattr(transformers, family.prompt_tokenizer.class_name))
    text = "a fox in the snow"
    added = len(tok(text)["input_ids"]) - len(tok(text, add_special_tokens=False)["input_ids"])
    assert added == family.prompt_tokenizer.special_tokens
    assert runner.max_prompt_tokens == tok.model_max_length - added


def _backend(data_dir: Path, name: str, **spec_fields: object) -> DiffusersBackend:
    catalogue = Catalogue.load([{"name": name, **spec_fields}]) if spec_fields else Catalogue.load()
    spec = catalogue.specs[name]
    return DiffusersBackend(
        spec, data_dir=data_dir, worker=DeviceWorker(), options=RuntimeOptions()
    )


def _params(model: str, **fields: object) -> GenerationParams:
    values: dict[str, object] = {
        "prompt": "a fox",
        "model": model,
        "width": 64,
        "height": 64,
        "n": 1,
        "seed": 1,
    }
    values.update(fields)
    return GenerationParams(**values)  # type: ignore[arg-type]


def test_size_multiple_comes_from_the_family(data_dir: Path) -> None:
    sdxl, flux = _backend(data_dir, "tiny-sdxl"), _backend(data_dir, "tiny-flux")
    assert sdxl.resolve(_params("tiny-sdxl", width=72)).width == 72
    with pytest.raises(InvalidParamsError, match="width must be a multiple of 16") as info:
        flux.resolve(_params("tiny-flux", width=72))
    assert info.value.param == "size"


def test_schedulers_and_their_default_come_from_the_family(data_dir: Path) -> None:
    flux = _backend(data_dir, "tiny-flux")
    with pytest.raises(InvalidParamsError, match="choose one of: flow_euler") as info:
        flux.resolve(_params("tiny-flux", scheduler="euler"))
    assert info.value.param == "scheduler"
    for kind in FAMILIES:
        # A user's model without a scheduler default gets its family's.
        mine = _backend(data_dir, "mine", kind=kind, source=f"builtin:{TINY[kind]}")
        assert mine.resolve(_params("mine")).scheduler == FAMILIES[kind].default_scheduler


def test_identity_reads_the_family(data_dir: Path) -> None:
    for kind, name in TINY.items():
        backend = _backend(data_dir, name)
        plain = backend.identity(_params(name)).as_dict()
        negative = backend.identity(_params(name, negative_prompt="fog")).as_dict()
        assert plain["pipeline"] == FAMILIES[kind].pipeline()
        assert plain["dtype"] == "float32" and plain["device"] == "cpu"
        assert plain["extra"]["true_cfg_scale"] is None
        # Only a true-CFG family spends a second pass (and a scale) on a negative prompt.
        true_cfg = FAMILIES[kind].negative_prompt == "true_cfg"
        assert (negative["extra"]["true_cfg_scale"] is not None) is true_cfg


def test_single_file_sources_are_refused_where_the_family_has_none(data_dir: Path) -> None:
    checkpoint = data_dir / "flux.safetensors"
    checkpoint.write_bytes(b"whatever")
    spec = Catalogue.load([{"name": "mine", "kind": "flux", "source": str(checkpoint)}])
    runner = PipelineRunner(spec.specs["mine"], data_dir=data_dir, options=RuntimeOptions())
    with pytest.raises(ModelUnavailableError, match="single-file checkpoints are not supported"):
        runner.load()


def test_no_import_cycles_within_models_local() -> None:
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("models", cache_dir=None)
    local = sorted(m for m in graph.modules if m.startswith("models.local."))
    cycles = [
        (a, b)
        for i, a in enumerate(local)
        for b in local[i + 1 :]
        if graph.chain_exists(a, b) and graph.chain_exists(b, a)
    ]
    assert cycles == []


def test_the_local_modules_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import models.local.backend, models.local.families, models.local.runtime\n"
        "import models.local.sources, models.local.tiny, models.local.worker\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
