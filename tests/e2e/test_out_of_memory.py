"""Out of device memory over HTTP: the worker's retries (split in half, then VAE tiling) all run
out too, so the request fails with a retryable 503 `out_of_memory` and Retry-After, nothing is
booked for it, and the server goes on serving. The runner raises on demand (the one way to
run a CPU out of GPU memory); everything around it is real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.base import OutOfMemoryError
from tests.helpers_server import (
    LiveServer,
    WatchedRunner,
    fresh_data_dir,
    tiny_settings,
    watched_server,
)

OOM = OutOfMemoryError("out of GPU memory for 1 image(s) at 64x64; lower n or the size")


@pytest.fixture(scope="module")
def watched(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[tuple[LiveServer, WatchedRunner]]:
    data = fresh_data_dir(tmp_path_factory.mktemp("oom"), tiny_models_dir)
    with watched_server(tiny_settings(data)) as live:
        yield live


def test_out_of_memory_is_a_retryable_503_and_the_server_goes_on(
    server: LiveServer, device: WatchedRunner
) -> None:
    body = {"prompt": "a big picture", "size": "64x64", "steps": 2}
    with server.client() as http:
        before = http.get("/v1/stats").json()["requests"]
        tried = len(device.batches)
        device.failing = OOM
        try:
            response = http.post("/v1/images/generations", json={**body, "seed": 1})
        finally:
            device.failing = None
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "out_of_memory"
        assert "VAE tiling" in error["message"]
        assert int(response.headers["Retry-After"]) >= 1
        # Tried whole, then with VAE tiling (one request: nothing to split).
        assert [batch.low_memory for batch in device.batches[tried:]] == [False, True]
        # Nothing booked for work that did not happen.
        assert http.get("/v1/stats").json()["requests"] == before
        for seed in range(2, 12):
            served = http.post("/v1/images/generations", json={**body, "seed": seed})
            assert served.status_code == 200
        assert http.get("/v1/stats").json()["requests"] == before + 10
