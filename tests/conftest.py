"""Shared fixtures: offline always, one built copy of the tiny models per session, and a fresh
data directory per test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# No test may reach the hub or any other network service.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED_SPECS = REPO.parent / "shared" / "specs"


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny models, built once per session through the real builder."""
    from models.local.tiny import TINY_MODELS, ensure_tiny_model

    root = tmp_path_factory.mktemp("tiny-build")
    for name in TINY_MODELS:
        ensure_tiny_model(root, name)
    return root


@pytest.fixture
def data_dir(tmp_path: Path, tiny_models_dir: Path) -> Path:
    """A fresh data directory that already holds the built tiny models (copied, so each
    test still loads them from its own folder through the normal loading code)."""
    target = tmp_path / "data"
    shutil.copytree(tiny_models_dir / "models", target / "models")
    return target


@pytest.fixture
def settings(data_dir: Path) -> object:
    from server.settings import Settings

    return Settings(data_dir=data_dir)


@pytest.fixture
def cli_env(data_dir: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env["IMAGEGEN_DATA_DIR"] = str(data_dir)
    env["HF_HUB_OFFLINE"] = "1"
    yield env
