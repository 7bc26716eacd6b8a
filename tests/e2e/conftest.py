"""Fixtures for the modules whose server runs behind a WatchedRunner: such a module defines a
module-scoped `watched` fixture (a `watched_server(...)`), and gets `server` and `device`."""

from __future__ import annotations

import pytest

from tests.helpers_server import LiveServer, WatchedRunner


@pytest.fixture
def server(watched: tuple[LiveServer, WatchedRunner]) -> LiveServer:
    return watched[0]


@pytest.fixture
def device(watched: tuple[LiveServer, WatchedRunner]) -> WatchedRunner:
    """What reached the device (the prompts and the steps of each batch), and its hold."""
    return watched[1]
