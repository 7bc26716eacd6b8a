"""A sticky device fault takes the server out of service: /readyz turns 503 for good and
`imagegen serve` stops with an error (exit code 1) so that a supervisor restarts it. The fault
is forced by a runner that raises a CUDA error on demand (tests/pipelines/test_device_fault)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from models.base import GenerationParams
from models.local.worker import WorkItem
from server import errors
from server.cli import exit_code_of
from server.serve_cmd import run
from server.service import ImageService
from tests.helpers_server import fresh_data_dir, live_server, tiny_settings
from tests.pipelines.test_device_fault import ILLEGAL_ADDRESS, ScriptedRunner

DEADLINE_S = 60


def fault_the_device(service: ImageService) -> None:
    """Run one batch on the service's own device worker that fails like a broken GPU."""
    item = WorkItem(
        params=GenerationParams(prompt="x", model="tiny-sdxl", width=64, height=64, n=1, seed=1),
        runner=ScriptedRunner(RuntimeError(ILLEGAL_ADDRESS)),
    )
    service.registry.worker.submit(item)
    assert item.future.exception(timeout=DEADLINE_S) is not None


def test_readyz_is_503_after_a_device_fault(tmp_path: Path, tiny_models_dir: Path) -> None:
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir))
    service = ImageService(settings)
    try:
        with live_server(settings, service=service) as server, server.client() as client:
            assert client.get("/readyz").status_code == 200
            fault_the_device(service)
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert "device failed" in ready.json()["error"]["message"]
            refused = client.post("/v1/images/generations", json={"prompt": "a cup"})
            assert refused.status_code == 503
    finally:
        service.close()


def test_serve_exits_with_an_error_after_a_device_fault(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir), host="127.0.0.1", port=0)
    service = ImageService(settings)
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            run(settings, models=["tiny-sdxl"], port=0, service=service)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=serve, name="test-serve")
    thread.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not service.backend("tiny-sdxl").loaded:
            assert thread.is_alive() and time.monotonic() < deadline, raised
            time.sleep(0.05)
        fault_the_device(service)
        thread.join(DEADLINE_S)
        assert not thread.is_alive(), "imagegen serve kept running after the device failed"
    finally:
        service.close()
    (error,) = raised
    assert isinstance(error, errors.DeviceFaultError)
    assert exit_code_of(error) == 1 and "device" in error.message


@pytest.fixture(autouse=True)
def _quiet_critical(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("CRITICAL")
