"""Fixtures for the e2e modules. A module whose server runs behind a WatchedRunner defines a
module-scoped `watched` fixture (a `watched_server(...)`), and gets `server` and `device`. A
module that reaches OpenAI gets `stub` (OpenAI's API on loopback) and `keyed` (a tiny-model
server with an OpenAI key, sending to the stub). `postgres` is a real PostgreSQL server for the
session and `postgres_url` a fresh database in it for one test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
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
from tests.postgres import PostgresServer, PostgresUnavailable, running_postgres
from tests.s3 import running_s3
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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (tests/postgres.py). Where none can run the
    tests that use it skip, saying why; under CI (CI=true, where scripts/setup installs it)
    they fail instead, so that a missing install cannot pass as a green run."""
    stack = ExitStack()
    try:
        server = stack.enter_context(running_postgres())
    except PostgresUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL tests: {exc}")
        pytest.skip(str(exc))
    with stack:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-speaking server on loopback (moto in server mode, tests/s3.py) with the
    bucket tests.s3.BUCKET; tests keep apart by key prefix."""
    with running_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def module_postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A new, empty database shared by one test module's tests (and the processes they
    start), dropped after it."""
    name = f"module_{os.urandom(6).hex()}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A new, empty database for this test alone (its URL), dropped after it."""
    name = f"test_{os.urandom(6).hex()}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)
