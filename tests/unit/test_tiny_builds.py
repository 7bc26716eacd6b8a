"""Start-up removes what killed tiny-model builds left behind, and nothing a live build in
another process still writes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from models.local import tiny


def _backdate(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _built(data_dir: Path, name: str) -> Path:
    """A model folder that counts as built (its marker), so start-up builds nothing."""
    folder = tiny.tiny_model_dir(data_dir, name)
    folder.mkdir(parents=True)
    (folder / "imagegen-tiny.json").write_text(
        json.dumps({"name": name, "version": tiny.TINY_BUILD_VERSION})
    )
    return folder


def test_start_up_removes_stale_build_folders_and_keeps_fresh_ones(tmp_path: Path) -> None:
    model = _built(tmp_path, "tiny-sdxl")
    models = model.parent
    stale = models / ".tiny-sdxl-killed"
    stale_other = models / ".tiny-flux-kontext-killed"  # another tiny model's build
    fresh = models / ".tiny-sdxl-building"  # another process's build in progress
    unrelated = models / ".notes-old"
    for folder in (stale, stale_other, fresh, unrelated):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text("{}")
    for folder in (stale, stale_other, unrelated):
        _backdate(folder, tiny.STALE_BUILD_S + 60)
    _backdate(fresh, tiny.STALE_BUILD_S - 60)

    assert tiny.ensure_tiny_model(tmp_path, "tiny-sdxl") == model

    assert not stale.exists() and not stale_other.exists()
    assert (fresh / "unet" / "config.json").is_file()
    assert unrelated.is_dir()
    assert tiny.is_built(model)


def test_no_models_folder_yet_is_not_an_error(tmp_path: Path) -> None:
    assert tiny.remove_stale_builds(tmp_path / "models") == []
