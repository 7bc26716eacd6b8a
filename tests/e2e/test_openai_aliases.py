"""The official `openai` SDK with the model names clients hard-code (dall-e-2, dall-e-3,
gpt-image-*) against a live server on the tiny model: served locally with no OpenAI key (the
response says what served it), sent to OpenAI (a stub on loopback) where a key is configured,
listed by /v1/models as aliases; and `url` results built on server.public_base_url."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from tests.helpers_server import API_KEY, LiveServer, fresh_data_dir, live_server, tiny_settings
from tests.stubs.openai_stub import OpenAIStub

PUBLIC = "https://images.example.test/gen"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("aliases"), tiny_models_dir)
    settings = tiny_settings(data, api_keys=[API_KEY], public_base_url=PUBLIC)
    with live_server(settings) as running:
        yield running


def sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def imagegen_info(response: openai.types.ImagesResponse) -> dict[str, object]:
    assert response.model_extra is not None
    info = response.model_extra["imagegen"]
    assert isinstance(info, dict)
    return info


@pytest.mark.parametrize("name", ["dall-e-3", "dall-e-2"])
def test_client_names_are_served_locally_without_an_openai_key(
    server: LiveServer, name: str
) -> None:
    response = sdk(server).images.generate(
        model=name, prompt="a paper boat", size="64x64", extra_body={"steps": 2, "seed": 4}
    )
    assert response.data is not None and response.data[0].b64_json
    with Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))) as decoded:
        assert decoded.size == (64, 64)
    info = imagegen_info(response)
    assert (info["model"], info["provider"]) == ("tiny-sdxl", "local")
    assert f"{name} is an alias of tiny-sdxl here (set by alias_model)" in str(info["notices"])


def test_an_alias_gives_the_pixels_of_its_target(server: LiveServer) -> None:
    def pixels(model: str) -> str | None:
        response = sdk(server).images.generate(
            model=model, prompt="a kite", size="64x64", extra_body={"steps": 2, "seed": 9}
        )
        assert response.data is not None
        return response.data[0].b64_json

    assert pixels("gpt-image-1") == pixels("tiny-sdxl")


def test_models_lists_the_aliases(server: LiveServer) -> None:
    cards = {card.id: card for card in sdk(server).models.list()}
    for name in ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"):
        assert cards[name].model_extra is not None
        assert cards[name].model_extra["alias_of"] == "tiny-sdxl", name
    assert cards["tiny-sdxl"].model_extra is not None
    assert cards["tiny-sdxl"].model_extra["alias_of"] is None
    one = sdk(server).models.retrieve("dall-e-3")
    assert one.model_extra is not None and one.model_extra["alias_of"] == "tiny-sdxl"


def test_url_results_are_built_on_public_base_url(server: LiveServer) -> None:
    response = sdk(server).images.generate(
        model="dall-e-2", prompt="a windmill", response_format="url", extra_body={"steps": 2}
    )
    assert response.data is not None and response.data[0].url
    assert response.data[0].url.startswith(f"{PUBLIC}/v1/files/")


def test_with_an_openai_key_gpt_image_2_goes_to_openai(keyed: LiveServer, stub: OpenAIStub) -> None:
    stub.state.reset()
    response = sdk(keyed).images.generate(model="gpt-image-2", prompt="a red fox", size="1024x1024")
    assert imagegen_info(response)["provider"] == "openai"
    (sent,) = stub.state.requests
    assert sent.json is not None and sent.json["model"] == "gpt-image-2"
    assert stub.state.invalid == []
    # A name the hosted catalogue does not hold still maps locally, and says so.
    local = sdk(keyed).images.generate(
        model="gpt-image-1.5", prompt="a red fox", size="64x64", extra_body={"steps": 2}
    )
    assert imagegen_info(local)["model"] == "tiny-sdxl"
    assert len(stub.state.requests) == 1
    cards = {card.id: card for card in sdk(keyed).models.list()}
    assert cards["gpt-image-2"].model_extra is not None
    assert cards["gpt-image-2"].model_extra["alias_of"] is None
    assert cards["gpt-image-1.5"].model_extra is not None
    assert cards["gpt-image-1.5"].model_extra["alias_of"] == "tiny-sdxl"
