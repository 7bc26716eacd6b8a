"""The HTTP API end to end against a live server (tiny-sdxl on CPU): the generations shape and
headers, url downloads, validation, the error envelope, models, stats, metrics and probes."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from server.service import ImageService
from tests.helpers_server import (
    LiveServer,
    fresh_data_dir,
    live_server,
    metric_value,
    start_server,
    tiny_settings,
)

SMALL = {"steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("api"), tiny_models_dir)
    with live_server(tiny_settings(data)) as live:
        yield live


def _error(response: object) -> dict[str, object]:
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_generation_shape_and_headers(server: LiveServer) -> None:
    with server.client() as client:
        body = {
            "prompt": "a red fox",
            "seed": 11,
            "n": 2,
            "quality": "hd",
            "style": "vivid",
            "user": "u-1",
            **SMALL,
        }
        first = client.post("/v1/images/generations", json=body)
        assert first.status_code == 200, first.text
        data = first.json()
        assert set(data) >= {"created", "data", "imagegen"}
        info = data["imagegen"]
        assert info["model"] == "tiny-sdxl" and info["provider"] == "local"
        assert info["cached"] is False
        assert set(info) >= {"request_id", "cost_usd", "gpu_seconds", "timings", "dropped_params"}
        assert {"quality", "style", "user"} <= set(info["dropped_params"])
        assert first.headers["X-Request-Id"] == info["request_id"]
        assert first.headers["X-Imagegen-Cache"] == "miss"
        assert float(first.headers["X-Imagegen-Cost-USD"]) == pytest.approx(info["cost_usd"])
        assert [item["seed"] for item in data["data"]] == [11, 12]
        for item in data["data"]:
            assert item["revised_prompt"] == "a red fox"
            assert "url" not in item
            with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
                assert image.size == (64, 64) and image.format == "PNG"

        again = client.post("/v1/images/generations", json=body)
        assert again.headers["X-Imagegen-Cache"] == "hit"
        assert again.json()["imagegen"]["cached"] is True
        assert float(again.headers["X-Imagegen-Cost-USD"]) == 0.0
        assert [i["b64_json"] for i in again.json()["data"]] == [
            i["b64_json"] for i in data["data"]
        ]


def test_url_format_points_at_the_cached_file(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post(
            "/v1/images/generations",
            json={"prompt": "a lighthouse", "seed": 5, "response_format": "url", **SMALL},
        )
        assert response.status_code == 200, response.text
        item = response.json()["data"][0]
        assert "b64_json" not in item
        url = item["url"]
        assert url.startswith(server.url + "/v1/files/")
        file_id = url.rsplit("/", 1)[1]
        download = client.get(url)
        assert download.status_code == 200
        assert download.headers["content-type"] == "image/png"
        assert hashlib.sha256(download.content).hexdigest() == file_id

        missing = client.get("/v1/files/" + "0" * 64)
        assert missing.status_code == 404
        assert _error(missing)["code"] == "not_found"


def test_png_compression_is_reported_dropped(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post(
            "/v1/images/generations",
            json={"prompt": "a bridge", "output_compression": 50, **SMALL},
        )
        assert response.status_code == 200
        assert "output_compression" in response.json()["imagegen"]["dropped_params"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "negative": "blurry"}, "negative"),
        ({"prompt": "x", "size": "1000x999"}, "size"),
        ({"prompt": "x", "size": "large"}, "size"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "response_format": "xml"}, "response_format"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "scheduler": "warp-drive"}, "scheduler"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream": True, "partial_images": 4}, "partial_images"),
        ({"prompt": ""}, "prompt"),
        ({"size": "64x64"}, "prompt"),
    ],
)
def test_validation_errors_name_the_field(
    server: LiveServer, body: dict[str, object], param: str
) -> None:
    with server.client() as client:
        response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    if param == "negative":
        assert "negative" in str(error["message"])


def test_body_that_is_not_json(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post(
            "/v1/images/generations", content=b"{nope", headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert "JSON" in str(_error(response)["message"])


def test_unknown_model_is_404(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post("/v1/images/generations", json={"prompt": "x", "model": "dalle-9"})
        assert response.status_code == 404
        error = _error(response)
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert client.get("/v1/models/dalle-9").status_code == 404


def test_blocked_prompt_is_content_policy_violation(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post("/v1/images/generations", json={"prompt": "a gory battle"})
    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "content_policy_violation" and error["param"] == "prompt"


def test_internal_errors_hide_their_details(server: LiveServer) -> None:
    def explode() -> None:
        raise RuntimeError("secret at /srv/internal/path.py")

    server.app.add_api_route("/v1/test-explode", explode, methods=["GET"])
    with server.client() as client:
        response = client.get("/v1/test-explode")
    assert response.status_code == 500
    error = _error(response)
    assert "secret" not in response.text and "/srv" not in response.text
    assert "Traceback" not in response.text
    assert response.headers["X-Request-Id"] in str(error["message"])


def test_unknown_route_uses_the_envelope(server: LiveServer) -> None:
    with server.client() as client:
        response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


def test_models_list_in_openai_shape(server: LiveServer) -> None:
    with server.client() as client:
        listing = client.get("/v1/models").json()
        assert listing["object"] == "list"
        tiny = next(m for m in listing["data"] if m["id"] == "tiny-sdxl")
        assert tiny["object"] == "model" and tiny["loaded"] is True
        assert isinstance(tiny["created"], int) and tiny["owned_by"] == "imagegen"
        assert client.get("/v1/models/tiny-sdxl").json()["id"] == "tiny-sdxl"


def test_stats_and_metrics(server: LiveServer) -> None:
    with server.client() as client:
        client.post("/v1/images/generations", json={"prompt": "a pear", "seed": 3, **SMALL})
        client.post("/v1/images/generations", json={"prompt": "a pear", "seed": 3, **SMALL})
        stats = client.get("/v1/stats").json()
        assert stats["requests"] >= 2 and stats["cached"] >= 1
        metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in (
        "imagegen_requests_total",
        "imagegen_queue_depth_images",
        "imagegen_batch_size_images",
        "imagegen_generation_seconds",
        "imagegen_queue_wait_seconds",
        "imagegen_gpu_seconds_total",
        "imagegen_cost_usd_total",
        "imagegen_cache_hits_total",
        "imagegen_cache_misses_total",
        "imagegen_pipeline_calls_total",
    ):
        assert name in text, name
    assert metric_value(text, "imagegen_requests_total", model="tiny-sdxl", status="200") >= 2
    assert metric_value(text, "imagegen_requests_total", model="unknown", status="404") >= 0
    assert metric_value(text, "imagegen_cache_hits_total", model="tiny-sdxl") >= 1


def test_readiness_waits_for_loading(tmp_path: Path, tiny_models_dir: Path) -> None:
    """Hold the worker (the thread that loads weights) so loading cannot finish: /livez
    answers, /readyz and generations are 503 until it is let go."""
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir))
    service = ImageService(settings)
    release = threading.Event()
    service.registry.worker.call(release.wait)
    live = start_server(settings, service=service, wait_ready=False)
    try:
        with live.client() as client:
            assert client.get("/livez").status_code == 200
            not_ready = client.get("/readyz")
            assert not_ready.status_code == 503
            assert _error(not_ready)["code"] == "not_ready"
            refused = client.post("/v1/images/generations", json={"prompt": "x"})
            assert refused.status_code == 503
            assert refused.headers["Retry-After"].isdigit()
            release.set()
            for _ in range(400):
                if client.get("/readyz").status_code == 200:
                    break
                threading.Event().wait(0.05)
            assert client.get("/readyz").json()["status"] == "ready"
    finally:
        release.set()
        live.stop()
        service.close()
