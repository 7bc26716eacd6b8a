"""Fixtures for the e2e modules. A module whose server runs behind a WatchedRunner defines a
module-scoped `watched` fixture (a `watched_server(...)`), and gets `server` and `device`. A
module that reaches OpenAI gets `stub` (OpenAI's API on loopback) and `keyed` (a tiny-model
server with an OpenAI key, sending to the stub)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers_server import (
    API_KEY,
    LiveServer,
    WatchedRunner,
    fresh_data_dir,
    live_server,
    tiny_settings,
)
from tests.stubs.common import require_specs
from tests.stubs.fixtures import FAST, live
from tests.stubs.openai_stub import OpenAIStub

OPENAI_KEY = "sk-test-openai-good"


@pytest.fixture
def server(watched: tuple[LiveServer, WatchedRunner]) -> LiveServer:
    return watched[0]


@pytest.fixture
def device(watched: tuple[LiveServer, WatchedRunner]) -> WatchedRunner:
    """What reached the device (the prompts and the steps of each batch), and its hold."""
    return watched[1]


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    require_specs()  # the stub checks every request against OpenAI's published schema
    with live(OpenAIStub(api_key=OPENAI_KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, stub: OpenAIStub
) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("keyed"), tiny_models_dir)
    providers = {"openai": {"base_url": stub.url, "api_key": OPENAI_KEY, **FAST}}
    settings = tiny_settings(data, api_keys=[API_KEY], top={"providers": providers})
    with live_server(settings) as running:
        yield running
