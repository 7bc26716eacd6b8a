"""Shared fixtures: offline always, one built copy of the tiny models per session, and a fresh
data directory per test. Tests live in tiers by folder, and the folder is the marker:
unit/ (torch-free), pipelines/ (tiny real diffusers pipelines on CPU), e2e/ (live servers,
subprocesses, real clients), gpu/ (opt-in, real CUDA). `pytest -m unit` runs one tier."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# No test may reach the hub or any other network service.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED_SPECS = REPO.parent / "shared" / "specs"
TIERS = ("unit", "pipelines", "e2e", "gpu")


def _tier(path: Path) -> str | None:
    parts = path.resolve().relative_to(REPO / "tests").parts
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = _tier(item.path)
        if tier is None:
            raise pytest.UsageError(
                f"{item.nodeid}: tests live in a tier folder ({', '.join(TIERS)}); move it there"
            )
        item.add_marker(tier)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The unit tier is torch-free by contract: a run of only unit tests that imported torch
    fails, naming the rule (scripts/check runs the unit tier on its own first)."""
    items = getattr(session, "items", [])
    if items and all(_tier(item.path) == "unit" for item in items) and "torch" in sys.modules:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(
            "\ntests/unit imported torch: unit tests must be torch-free "
            "(move the test to tests/pipelines or keep torch out of its imports)",
            file=sys.stderr,
        )


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
