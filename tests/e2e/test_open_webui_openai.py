"""Open WebUI's "openai" image engine, replayed as it sends (it is too heavy to install)
against a live server with API keys off, as its backend/open_webui/routers/images.py sends it:
the JSON generations body (model "dall-e-2" when none is set, response_format left out for
models matching ^gpt-image, IMAGES_OPENAI_API_PARAMS merged at the top level), multipart edits
built with aiohttp's FormData (every value a str() in a text/plain part, one image as `image`,
a list as repeated `image[]`, files named <uuid>.<ext> typed from the data URL), and the
`Authorization: Bearer ` header with nothing after it when no key is set. Each answer is read
as Open WebUI reads it: data[i].url if present (which its SSRF guard would refuse for a LAN
server), else data[i].b64_json, raw base64 taken as PNG."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from tests.helpers_images import gradient
from tests.helpers_server import LiveServer, fresh_data_dir, live_server, tiny_settings

# Open WebUI's default IMAGE_SIZE is 512x512. The tiny model takes ~40 s for that on two CPU
# cores (its 4 default steps at 64x the pixels), too slow for CI: the replays ask 64x64, the
# one change from the default body.
SIZE = "64x64"
# aiohttp's FormData gives every str value this part type (httpx would send none).
TEXT = "text/plain; charset=utf-8"
# What an admin puts in IMAGES_OPENAI_API_PARAMS to reach imagegen's own fields.
API_PARAMS = {"negative_prompt": "blurry", "seed": 42, "steps": 2, "guidance_scale": 4.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("open-webui"), tiny_models_dir)
    with live_server(tiny_settings(data)) as live:  # no api_keys: Open WebUI with no key set
        yield live


def send(
    server: LiveServer, path: str, body: bytes, content_type: str, extra: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """POST as aiohttp sends it. Through http.client: httpx (h11) refuses to send the header
    value "Bearer " with its trailing space, which Open WebUI sends with no key set."""
    url = urlsplit(server.url)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    headers = {
        "Authorization": "Bearer ",
        "Content-Type": content_type,
        "Accept": "*/*",
        "User-Agent": "Python/3.11 aiohttp/3.12.15",  # aiohttp's default, in its form
        **extra,
    }
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        # Open WebUI reads with r.json(content_type=None): whatever the type says.
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def generations(
    server: LiveServer, body: dict[str, Any], *, query: str = "", **headers: str
) -> list[dict[str, Any]]:
    """`session.post(url, json=data, headers=...)`: aiohttp's json= is json.dumps(data)."""
    status, answer = send(
        server,
        f"/v1/images/generations{query}",
        json.dumps(body).encode(),
        "application/json",
        headers,
    )
    assert status == 200, answer
    return list(answer["data"])


def edits(
    server: LiveServer, fields: dict[str, Any], images: list[str] | str
) -> list[dict[str, Any]]:
    """Open WebUI's image_edits: `form.add_field(key, str(value))` for each field, then the
    files from get_image_file_item. httpx encodes the same parts aiohttp's FormData does."""
    parts: list[tuple[str, tuple[str | None, bytes | str, str]]] = [
        (key, (None, str(value), TEXT)) for key, value in fields.items()
    ]
    if isinstance(images, str):
        parts.append(image_file_item(images, "image"))
    else:
        parts.extend(image_file_item(image, "image[]") for image in images)
    request = httpx.Request("POST", "http://unused/", files=parts)
    status, answer = send(
        server, "/v1/images/edits", request.read(), request.headers["Content-Type"], {}
    )
    assert status == 200, answer
    return list(answer["data"])


def image_file_item(data_url: str, field: str) -> tuple[str, tuple[str, bytes, str]]:
    """Open WebUI's get_image_file_item: the type from the data URL, a <uuid>.<ext> name."""
    header, encoded = data_url.split(",", 1)
    mime = header.split(";")[0].removeprefix("data:") or "image/png"
    extension = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp"}[mime]
    return field, (f"{uuid.uuid4()}{extension}", base64.b64decode(encoded), mime)


def data_url(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def read_image(item: dict[str, Any], size: str = SIZE) -> bytes:
    """Open WebUI's get_image_data on one result: a url would be fetched (and refused by its
    SSRF guard for a LAN address), so there must be none; b64_json, raw base64 is PNG."""
    assert not item.get("url"), "a url result breaks Open WebUI for a LAN server"
    b64 = item["b64_json"]
    assert isinstance(b64, str) and "," not in b64  # raw base64: Open WebUI assumes image/png
    raw = base64.b64decode(b64)
    with Image.open(io.BytesIO(raw)) as image:
        assert image.format == "PNG"
        assert f"{image.width}x{image.height}" == size
    return raw


def default_body(model: str, prompt: str, **params: Any) -> dict[str, Any]:
    """The body image_generations builds: model, prompt, n, size, response_format unless the
    model matches IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN (^gpt-image), then the admin's
    IMAGES_OPENAI_API_PARAMS."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "n": 1, "size": SIZE}
    if not model.startswith("gpt-image"):
        body["response_format"] = "b64_json"
    return {**body, **params}


def test_the_default_body_with_the_fallback_model(server: LiveServer) -> None:
    # No model configured: Open WebUI sends "dall-e-2"; no IMAGES_OPENAI_API_PARAMS either.
    (item,) = generations(server, default_body("dall-e-2", "a lighthouse at dusk"))
    read_image(item)


@pytest.mark.parametrize("model", ["dall-e-3", "gpt-image-1", "gpt-image-1.5"])
def test_every_model_of_its_hard_coded_list(server: LiveServer, model: str) -> None:
    """GET /api/v1/images/models offers dall-e-2, dall-e-3, gpt-image-1 and gpt-image-1.5;
    the gpt-image ones go out without response_format, so the default must be b64_json."""
    body = default_body(model, "a red kite", steps=2)
    assert ("response_format" in body) == (model == "dall-e-3")
    (item,) = generations(server, body)
    read_image(item)


def test_api_params_are_merged_and_honoured(server: LiveServer) -> None:
    """IMAGES_OPENAI_API_PARAMS land at the top level of the body: n=2 gives two images with
    consecutive seeds, and changing any one parameter changes the pixels (one that was
    ignored would give the same request, answered from the cache with the same bytes)."""
    body = default_body("dall-e-2", "a windmill", n=2, **API_PARAMS)
    images = generations(server, body)
    assert [item["seed"] for item in images] == [42, 43]  # imagegen's extra field
    first = [read_image(item) for item in images]
    assert first[0] != first[1]
    for change in ({"seed": 7}, {"steps": 3}, {"guidance_scale": 9.0}, {"negative_prompt": "x"}):
        (other, _) = generations(server, {**body, **change})
        assert read_image(other) != first[0], change


def test_its_optional_query_and_headers_are_accepted(server: LiveServer) -> None:
    """IMAGES_OPENAI_API_VERSION adds ?api-version=; ENABLE_FORWARD_USER_INFO_HEADERS adds
    the X-OpenWebUI-User-* headers."""
    (item,) = generations(
        server,
        default_body("dall-e-2", "a tugboat", steps=2),
        query="?api-version=2024-02-01",
        **{
            "X-OpenWebUI-User-Name": "Ada",
            "X-OpenWebUI-User-Id": "u-1",
            "X-OpenWebUI-User-Email": "ada@example.test",
            "X-OpenWebUI-User-Role": "admin",
        },
    )
    read_image(item)


def test_an_edit_as_sent_by_default(server: LiveServer) -> None:
    """IMAGE_EDIT_MODEL and IMAGE_EDIT_SIZE default to "": the model goes out as an empty
    string, no size or n, and the output keeps the input's size."""
    source = gradient(64, 64)
    fields = {"model": "", "prompt": "make it dusk", "response_format": "b64_json"}
    (item,) = edits(server, fields, data_url(source, "PNG"))
    read_image(item)


def test_an_edit_of_several_images(server: LiveServer) -> None:
    """A list of images: repeated `image[]`, each typed from its own data URL (a JPEG among
    them), with n and size as the str() of their values."""
    fields = {
        "model": "dall-e-2",
        "prompt": "blend them",
        "n": 2,
        "size": SIZE,
        "background": "opaque",
        "response_format": "b64_json",
    }
    sources = [data_url(gradient(64, 64), "PNG"), data_url(gradient(64, 64), "JPEG")]
    results = edits(server, fields, sources)
    assert len(results) == 2
    for item in results:
        read_image(item)
