"""The official `openai` SDK against a live server: it generates (b64_json and url), passes
imagegen's extensions through extra_body, and maps our errors onto its exception types."""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from tests.helpers_server import (
    API_KEY,
    LiveServer,
    fresh_data_dir,
    live_server,
    tiny_settings,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("sdk"), tiny_models_dir)
    # Two images of queue: the rate-limit test fills it with real work.
    settings = tiny_settings(data, api_keys=[API_KEY], local={"max_queue_images": 2})
    with live_server(settings) as live:
        yield live


def sdk(server: LiveServer, api_key: str = API_KEY) -> openai.OpenAI:
    # No retries: every error must surface as the exception the SDK maps it to.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)


def test_generate_b64_json_with_extensions(server: LiveServer) -> None:
    client = sdk(server)
    extra = {"seed": 1234, "negative_prompt": "blurry", "steps": 2}
    first = client.images.generate(
        model="tiny-sdxl",
        prompt="a paper boat",
        size="64x64",
        response_format="b64_json",
        extra_body=extra,
    )
    assert first.data is not None and len(first.data) == 1
    image = first.data[0]
    assert image.b64_json
    with Image.open(io.BytesIO(base64.b64decode(image.b64_json))) as decoded:
        assert decoded.size == (64, 64)
    assert image.model_extra is not None and image.model_extra["seed"] == 1234
    assert image.revised_prompt == "a paper boat"
    # The same seed and negative prompt give the same image (served from the cache).
    second = client.images.with_raw_response.generate(
        model="tiny-sdxl",
        prompt="a paper boat",
        size="64x64",
        response_format="b64_json",
        extra_body=extra,
    )
    assert second.headers["X-Imagegen-Cache"] == "hit"
    parsed = second.parse()
    assert parsed.data is not None and parsed.data[0].b64_json == image.b64_json
    # A different negative prompt is a different request.
    other = client.images.generate(
        model="tiny-sdxl",
        prompt="a paper boat",
        size="64x64",
        response_format="b64_json",
        extra_body={**extra, "negative_prompt": "sharp"},
    )
    assert other.data is not None and other.data[0].b64_json != image.b64_json


def test_generate_url(server: LiveServer) -> None:
    client = sdk(server)
    response = client.images.generate(
        model="tiny-sdxl",
        prompt="a windmill",
        response_format="url",
        n=2,
        extra_body={"steps": 2},
    )
    assert response.data is not None and len(response.data) == 2
    for item in response.data:
        assert item.url and item.url.startswith(server.url)
        download = httpx.get(item.url, headers={"Authorization": f"Bearer {API_KEY}"})
        assert download.status_code == 200
        with Image.open(io.BytesIO(download.content)) as decoded:
            assert decoded.format == "PNG" and decoded.size == (64, 64)


def test_bad_size_is_bad_request(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(server).images.generate(model="tiny-sdxl", prompt="x", size="1000x999")  # type: ignore[arg-type]
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "size"


def test_unknown_field_is_bad_request(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(server).images.generate(model="tiny-sdxl", prompt="x", extra_body={"negative": "y"})
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "negative"


def test_unknown_model_is_not_found(server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk(server).images.generate(model="no-such-model", prompt="x")


def test_wrong_key_is_authentication_error(server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk(server, api_key="wrong").images.generate(model="tiny-sdxl", prompt="x")


def test_models_list(server: LiveServer) -> None:
    ids = [model.id for model in sdk(server).models.list()]
    assert "tiny-sdxl" in ids


def test_overload_is_rate_limit_error(server: LiveServer) -> None:
    """Real work fills the two-image queue: one job runs, one of n=2 waits, the SDK call is
    refused."""
    with server.client(API_KEY) as http:
        running = http.post("/v1/jobs", json={"prompt": "runs", "steps": 150}).json()
        while http.get(f"/v1/jobs/{running['id']}").json()["status"] != "running":
            time.sleep(0.01)
        waiting = http.post("/v1/jobs", json={"prompt": "waits", "steps": 150, "n": 2})
        assert waiting.status_code == 202
        try:
            with pytest.raises(openai.RateLimitError) as caught:
                sdk(server).images.generate(
                    model="tiny-sdxl", prompt="one too many", extra_body={"steps": 2}
                )
            retry_after = caught.value.response.headers["Retry-After"]
            assert retry_after.isdigit() and int(retry_after) >= 1
        finally:
            http.delete(f"/v1/jobs/{waiting.json()['id']}")
            http.delete(f"/v1/jobs/{running['id']}")
