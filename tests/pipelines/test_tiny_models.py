"""The built-in tiny pipelines: built offline, deterministic, loaded like any local folder."""

from __future__ import annotations

import hashlib
import logging
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


def test_single_file_checkpoint_loads_through_from_single_file(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken single file says so; it never yields placeholder images. The client learns the
    failure's type; what the loader said (paths, header bytes) is in the log only."""
    from models.catalogue import Catalogue
    from models.local.pipeline import PipelineRunner, RuntimeOptions

    bogus = data_dir / "broken.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    spec = Catalogue.load([{"name": "mine", "kind": "sdxl", "source": str(bogus)}]).specs["mine"]
    runner = PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions())
    with (
        caplog.at_level(logging.ERROR, logger="models.local.pipeline"),
        pytest.raises(ModelUnavailableError) as info,
    ):
        runner.load()
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None
    cause = record.exc_info[1]
    assert info.value.message == (
        f"model 'mine' could not be loaded from its source ({type(cause).__name__}); "
        "the server log has the details"
    )
    assert str(cause) not in info.value.message and str(bogus) not in info.value.message
    assert str(bogus) in caplog.text and "Traceback" in caplog.text


def test_model_listing_says_where_each_local_source_stands(tmp_path: Path, data_dir: Path) -> None:
    from models.catalogue import Catalogue
    from server.registry import BackendRegistry
    from server.settings import Settings

    entries = [
        {"name": "folder", "kind": "sdxl", "source": str(data_dir / "models" / "tiny-sdxl")},
        {"name": "no-folder", "kind": "sdxl", "source": "/nonexistent/folder"},
        {"name": "no-file", "kind": "sdxl", "source": "/nonexistent/model.safetensors"},
        {"name": "no-hub", "kind": "flux", "source": "someone/not-downloaded-model"},
    ]
    fields = ("builtin", "on_disk", "available", "reason")

    def rows(data: Path) -> dict[str, dict[str, object]]:
        registry = BackendRegistry(Settings(data_dir=data), Catalogue.load(entries))
        return {
            row["name"]: {k: row[k] for k in fields if k in row}
            for row in registry.describe()
            if row["provider"] == "local"
        }

    built = rows(data_dir)
    assert built["tiny-sdxl"] == {"builtin": True, "on_disk": True, "available": True}
    assert built["folder"] == {"builtin": False, "on_disk": True, "available": True}
    missing = {"builtin": False, "on_disk": False, "available": False}
    assert built["no-folder"] == {
        **missing,
        "reason": "'/nonexistent/folder' is not a diffusers model folder",
    }
    assert built["no-file"] == {
        **missing,
        "reason": "checkpoint file '/nonexistent/model.safetensors' does not exist",
    }
    assert built["no-hub"]["available"] is False
    assert "imagegen pull someone/not-downloaded-model" in str(built["no-hub"]["reason"])
    # A built-in is available before it is built: it is built offline on first use.
    fresh = rows(tmp_path / "fresh")
    assert fresh["tiny-flux"] == {"builtin": True, "on_disk": False, "available": True}


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
