"""Out of device memory over HTTP: the worker's retries (split in half, then VAE tiling) all run
out too, so the request fails with a retryable 503 `out_of_memory` and Retry-After, nothing is
booked for it, and the server goes on serving. The runner raises on demand (the one way to
run a CPU out of GPU memory); everything around it is real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.base import GenerationParams, OutOfMemoryError
from models.catalogue import Catalogue
from models.local.pipeline import StepHook
from models.local.worker import Runner
from server.registry import BackendRegistry
from server.service import ImageService
from tests.helpers_server import (
    LiveServer,
    WatchedRunner,
    fresh_data_dir,
    live_server,
    tiny_settings,
)


class ShortOfMemory(WatchedRunner):
    """The real runner, but out of memory on every call while `short` is set."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner)
        self.short = False
        self.tries: list[bool] = []  # low_memory of each call made while short

    def run_batch(
        self,
        batch: list[GenerationParams],
        *,
        precise: bool = False,
        on_step: StepHook | None = None,
        low_memory: bool = False,
    ) -> Any:
        if self.short:
            self.tries.append(low_memory)
            raise OutOfMemoryError("out of GPU memory for 1 image(s) at 64x64; lower n or the size")
        return super().run_batch(batch, precise=precise, on_step=on_step, low_memory=low_memory)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[tuple[LiveServer, list[ShortOfMemory]]]:
    data = fresh_data_dir(tmp_path_factory.mktemp("oom"), tiny_models_dir)
    settings = tiny_settings(data)
    runners: list[ShortOfMemory] = []

    def wrap(inner: Runner) -> Runner:
        runners.append(ShortOfMemory(inner))
        return runners[-1]

    registry = BackendRegistry(settings, Catalogue.load(settings.models), wrap_runner=wrap)
    service = ImageService(settings, registry=registry)
    try:
        with live_server(settings, service=service) as live:
            yield live, runners
    finally:
        service.close()


def test_out_of_memory_is_a_retryable_503_and_the_server_goes_on(
    server: tuple[LiveServer, list[ShortOfMemory]],
) -> None:
    live, runners = server
    (runner,) = runners
    body = {"prompt": "a big picture", "size": "64x64", "steps": 2}
    with live.client() as http:
        before = http.get("/v1/stats").json()["requests"]
        runner.short = True
        try:
            response = http.post("/v1/images/generations", json={**body, "seed": 1})
        finally:
            runner.short = False
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "out_of_memory"
        assert "VAE tiling" in error["message"]
        assert int(response.headers["Retry-After"]) >= 1
        # Tried whole, then with VAE tiling (one request: nothing to split).
        assert runner.tries == [False, True]
        # Nothing booked for work that did not happen.
        assert http.get("/v1/stats").json()["requests"] == before
        for seed in range(2, 12):
            served = http.post("/v1/images/generations", json={**body, "seed": seed})
            assert served.status_code == 200
        assert http.get("/v1/stats").json()["requests"] == before + 10
