"""Internal exception text is logged with the request id, never returned: an unexpected error
in a backend is a 500 (or a failed job) with a stable message naming the request id, in the
error shape of the route's API (OpenAI's, or A1111's on /sdapi/v1), and a model load that
fails unexpectedly leaves /readyz saying so without the exception's text."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from models.base import NO_EVENTS, Backend
from models.catalogue import Catalogue
from server.registry import BackendRegistry
from server.service import ImageService
from server.settings import Settings
from tests.helpers_server import fresh_data_dir, live_server, tiny_settings

SECRET = "secret internal detail 0x7f3a"


class _Broken:
    """A backend whose `generate` (or `load`) fails with an exception that is not an
    imagegen error: an internal bug, whose text must stay in the log."""

    def __init__(self, inner: Backend, *, on: str) -> None:
        self.inner = inner
        self.on = on

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def load(self) -> None:
        if self.on == "load":
            raise RuntimeError(SECRET)
        await self.inner.load()

    async def generate(self, params: Any, events: Any = NO_EVENTS, *, precise: bool = False) -> Any:
        if self.on == "generate":
            raise ValueError(SECRET)
        return await self.inner.generate(params, events, precise=precise)


def broken_service(settings: Settings, on: str) -> ImageService:
    def wrap(real: Backend) -> Backend:
        return _Broken(real, on=on)  # type: ignore[return-value]

    registry = BackendRegistry(settings, Catalogue.load(settings.models), wrap=wrap)
    return ImageService(settings, registry=registry)


def test_unexpected_error_is_a_500_with_the_request_id_only(
    tmp_path: Path, tiny_models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir), models=[])
    service = broken_service(settings, "generate")
    body = {"prompt": "a lamp", "size": "64x64", "steps": 2}
    try:
        with live_server(settings, service=service) as server, server.client() as client:
            caplog.set_level(logging.ERROR)
            response = client.post("/v1/images/generations", json=body)
            assert response.status_code == 500
            request_id = response.headers["X-Request-Id"]
            error = response.json()["error"]
            assert error["code"] == "internal_error" and request_id in error["message"]
            assert SECRET not in response.text
            # The log has the text, under the same request id.
            logged = [r for r in caplog.records if request_id in r.getMessage()]
            assert logged and any(SECRET in str(r.exc_info) for r in logged)

            job = client.post("/v1/jobs", json=body).json()
            deadline = time.monotonic() + 60
            while job["status"] not in ("failed", "succeeded") and time.monotonic() < deadline:
                job = client.get(f"/v1/jobs/{job['id']}").json()
                time.sleep(0.02)
            assert job["status"] == "failed" and job["error"]["code"] == "internal_error"
            assert SECRET not in str(job)
    finally:
        service.close()


def test_unexpected_error_on_an_a1111_route_is_a1111s_500(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    """A1111's clients read its own error body: the catch-all 500 on /sdapi/v1 is in it, with
    the request id and without the exception's text."""
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir), models=[])
    service = broken_service(settings, "generate")
    body = {"prompt": "a lamp", "width": 64, "height": 64, "steps": 2}
    try:
        with live_server(settings, service=service) as server, server.client() as client:
            response = client.post("/sdapi/v1/txt2img", json=body)
            assert response.status_code == 500
            error = response.json()
            assert set(error) == {"error", "detail", "body", "errors"}, error
            assert error["error"] == "internal_error"
            assert response.headers["X-Request-Id"] in error["detail"]
            assert SECRET not in response.text
    finally:
        service.close()


def test_failed_load_leaves_readyz_without_the_exception_text(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir))
    service = broken_service(settings, "load")
    try:
        with (
            live_server(settings, service=service, wait_ready=False) as server,
            server.client() as client,
        ):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ready = client.get("/readyz")
                if "failed" in ready.text:
                    break
                time.sleep(0.05)
            assert ready.status_code == 503 and "model loading failed" in ready.text
            assert SECRET not in ready.text
    finally:
        service.close()
