"""Prompt weighting (A1111's attention syntax) is the same on every HTTP surface: through the
OpenAI route and the A1111 route one weighted prompt gives one picture, `(word:1.0)` gives the
pixels of `word`, and `(word:1.5)` changes them."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers_server import LiveServer, fresh_data_dir, live_server, tiny_settings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("weights"), tiny_models_dir)
    # The cache off: each route's pixels come from its own run on the device.
    with live_server(tiny_settings(data, top={"cache_max_bytes": 0})) as live:
        yield live


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))


def openai_route(server: LiveServer, prompt: str) -> np.ndarray:
    body = {
        "model": "tiny-sdxl",
        "prompt": prompt,
        "size": "64x64",
        "seed": 11,
        "steps": 4,
        "guidance_scale": 5.0,
        "scheduler": "euler",
    }
    with server.client() as http:
        response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    return pixels(response.json()["data"][0]["b64_json"])


def a1111_route(server: LiveServer, prompt: str) -> np.ndarray:
    body = {
        "prompt": prompt,
        "width": 64,
        "height": 64,
        "seed": 11,
        "steps": 4,
        "cfg_scale": 5.0,
        "sampler_name": "Euler",
        "scheduler": "automatic",
        "override_settings": {"sd_model_checkpoint": "tiny-sdxl"},
    }
    with server.client() as http:
        response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    return pixels(response.json()["images"][0])


@pytest.mark.parametrize("route", [openai_route, a1111_route])
def test_unit_weight_is_the_plain_word_and_more_weight_changes_it(
    route: Callable[[LiveServer, str], np.ndarray], server: LiveServer
) -> None:
    plain = route(server, "a red cube on a table")
    assert np.array_equal(route(server, "a (red:1.0) cube on a table"), plain)
    assert not np.array_equal(route(server, "a (red:1.5) cube on a table"), plain)


def test_both_routes_weight_alike(server: LiveServer) -> None:
    prompt = "a (red:1.5) cube on a [table]"
    assert np.array_equal(openai_route(server, prompt), a1111_route(server, prompt))
