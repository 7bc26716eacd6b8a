"""The built-in tiny pipelines: built offline, deterministic, loaded like any local folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from models.base import ModelUnavailableError
from models.local import sources, tiny


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", tiny.TINY_MODELS)
def test_building_twice_gives_identical_files(
    tmp_path: Path, tiny_models_dir: Path, name: str
) -> None:
    again = tiny.ensure_tiny_model(tmp_path, name)
    first = tiny.tiny_model_dir(tiny_models_dir, name)
    assert _digest(again) == _digest(first)
    assert any(p.suffix == ".safetensors" for p in again.rglob("*"))


def test_builtin_resolves_to_a_diffusers_folder_with_a_content_revision(data_dir: Path) -> None:
    resolved = sources.resolve("builtin:tiny-sdxl", data_dir=data_dir)
    assert resolved.kind == "builtin"
    assert (resolved.path / "model_index.json").is_file()
    assert resolved.revision.startswith("sha256:")
    # The same files through the plain-folder path give the same revision.
    as_folder = sources.resolve(str(resolved.path), data_dir=data_dir)
    assert as_folder.kind == "folder" and as_folder.revision == resolved.revision


def test_unfinished_build_is_rebuilt(tmp_path: Path) -> None:
    folder = tiny.tiny_model_dir(tmp_path, "tiny-flux")
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")  # no completion marker
    assert not tiny.is_built(folder)
    tiny.ensure_tiny_model(tmp_path, "tiny-flux")
    assert tiny.is_built(folder)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("/nonexistent/folder", "not a diffusers model folder"),
        ("/nonexistent/model.safetensors", "does not exist"),
        ("someone/not-downloaded-model", "not in the local Hugging Face cache"),
        ("builtin:tiny-nothing", "unknown built-in"),
    ],
)
def test_missing_sources_say_what_to_do(tmp_path: Path, source: str, needle: str) -> None:
    with pytest.raises(ModelUnavailableError, match=needle):
        sources.resolve(source, data_dir=tmp_path)


def test_classify_sources() -> None:
    assert sources.classify("builtin:tiny-sdxl") == "builtin"
    assert sources.classify("stabilityai/stable-diffusion-xl-base-1.0") == "hub"
    assert sources.classify("./models/mine") == "folder"
    assert sources.classify("/weights/sd_xl_base_1.0.safetensors") == "single_file"


def test_xformers_asked_for_but_missing_is_a_clear_error(data_dir: Path) -> None:
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    from models.catalogue import Catalogue
    from models.local.pipeline import PipelineRunner, RuntimeOptions

    spec = Catalogue.load().specs["tiny-sdxl"]
    runner = PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions(attention="xformers"))
    with pytest.raises(ModelUnavailableError, match="xformers is not installed"):
        runner.load()


def test_single_file_checkpoint_loads_through_from_single_file(data_dir: Path) -> None:
    """A broken single file says so; it never yields placeholder images."""
    from models.catalogue import Catalogue
    from models.local.pipeline import PipelineRunner, RuntimeOptions

    bogus = data_dir / "broken.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    spec = Catalogue.load([{"name": "mine", "kind": "sdxl", "source": str(bogus)}]).specs["mine"]
    runner = PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions())
    with pytest.raises(ModelUnavailableError, match="could not be loaded"):
        runner.load()


def test_prompt_token_counts_are_the_tokenizers_and_stay_bounded(data_dir: Path) -> None:
    from models.catalogue import Catalogue
    from models.local import pipeline
    from models.local.pipeline import PipelineRunner, RuntimeOptions

    spec = Catalogue.load().specs["tiny-sdxl"]
    runner = PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions())
    tok = runner.tokenizer()
    for text in ("a fox", "a fox in the snow, at dawn", "a fox"):
        assert runner.count_tokens(text) == len(tok(text, add_special_tokens=False)["input_ids"])
    for i in range(pipeline._TOKEN_COUNTS_KEPT + 5):
        runner.count_tokens(f"prompt {i}")
    assert len(runner._token_counts) <= pipeline._TOKEN_COUNTS_KEPT
