"""LiteLLM's SDK (`litellm.image_generation`, `litellm.image_edit` with model "openai/<id>")
against a live server with API keys, as its users point it at imagegen: b64_json without asking
(it cannot send response_format for such models), its extra kwargs as imagegen's fields, the
aliases, edits with and without a mask, and our errors inside its exceptions. Loopback only:
a connection or name lookup that would leave it is refused and fails the test."""

from __future__ import annotations

import base64
import importlib
import io
import ipaddress
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import openai
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from tests.helpers_images import alpha_mask, gradient, png
from tests.helpers_server import API_KEY, LiveServer, fresh_data_dir, live_server, tiny_settings

# LiteLLM's own TypedDicts, built lazily on first use: pydantic notes it cannot enforce their
# ReadOnly items. Upstream and harmless; any other warning still fails the test.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Items? .* using the `ReadOnly` qualifier:UserWarning"
)

SIZE = 64
BOX = (16, 16, 48, 48)  # the transparent square of the mask: the area to edit


class LoopbackOnly:
    """Refuses and records every connect and name lookup of a Python socket (what httpx,
    aiohttp and the stdlib use) that would leave loopback.
    Recorded, not only refused: LiteLLM swallows some failures (its cost-map fetch falls back
    to the bundled copy), so a refusal alone could go unseen."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def install(self, patch: pytest.MonkeyPatch) -> None:
        real_connect = socket.socket.connect
        real_connect_ex = socket.socket.connect_ex
        real_getaddrinfo = socket.getaddrinfo

        def connect(sock: socket.socket, address: Any) -> None:
            self._check(sock.family, address)
            real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            self._check(sock.family, address)
            return real_connect_ex(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host is not None and not _is_loopback_host(host):
                self.attempts.append(f"getaddrinfo {host!r}")
                raise socket.gaierror(socket.EAI_NONAME, f"test: {host!r} is off loopback")
            return real_getaddrinfo(host, *args, **kwargs)

        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket.socket, "connect_ex", connect_ex)
        patch.setattr(socket, "getaddrinfo", getaddrinfo)

    def _check(self, family: int, address: Any) -> None:
        if family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback_host(address[0]):
            self.attempts.append(f"connect {address!r}")
            raise OSError(f"test: connection to {address!r} leaves loopback")


def _is_loopback_host(host: str | bytes) -> bool:
    name = host.decode() if isinstance(host, bytes) else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def loopback_only() -> Iterator[LoopbackOnly]:
    guard = LoopbackOnly()
    with pytest.MonkeyPatch.context() as patch:
        guard.install(patch)
        # Without it LiteLLM fetches its model cost map from the internet at import.
        patch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        yield guard


@pytest.fixture(scope="module")
def litellm(loopback_only: LoopbackOnly) -> ModuleType:
    """LiteLLM, imported under the guard (its import is where network use would start)."""
    module = importlib.import_module("litellm")
    module.suppress_debug_info = True  # no "Give Feedback / Get Help" banner per error
    return module


@pytest.fixture(autouse=True)
def stays_on_loopback(loopback_only: LoopbackOnly, litellm: ModuleType) -> Iterator[None]:
    # Checked before each test too: the import (in the first test's setup) counts.
    assert loopback_only.attempts == [], "LiteLLM left loopback"
    yield
    assert loopback_only.attempts == [], "LiteLLM left loopback"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("litellm"), tiny_models_dir)
    with live_server(tiny_settings(data, api_keys=[API_KEY])) as live:
        yield live


def generate(
    litellm: ModuleType,
    server: LiveServer,
    model: str = "tiny-sdxl",
    prompt: str = "a paper boat",
    **kw: Any,
) -> Any:
    return litellm.image_generation(
        model=f"openai/{model}",
        api_base=f"{server.url}/v1",
        api_key=API_KEY,
        prompt=prompt,
        size=f"{SIZE}x{SIZE}",
        **kw,
    )


def edit(litellm: ModuleType, server: LiveServer, image: Path, **kw: Any) -> Any:
    with image.open("rb") as file:
        return litellm.image_edit(
            model="openai/tiny-sdxl",
            image=file,
            prompt="a lighthouse",
            size=f"{SIZE}x{SIZE}",
            api_base=f"{server.url}/v1",
            api_key=API_KEY,
            **kw,
        )


def b64_of(response: Any) -> str:
    (item,) = response.data
    assert item.b64_json, "no b64_json in LiteLLM's response"
    return str(item.b64_json)


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def direct(server: LiveServer, path: str, **kwargs: Any) -> str:
    """The same request sent straight to the server: its one image, as b64_json."""
    with server.client(API_KEY) as http:
        response = http.post(path, **kwargs)
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    return str(item["b64_json"])


def test_the_guard_sees_a_connection_that_leaves_loopback(loopback_only: LoopbackOnly) -> None:
    with socket.socket() as sock, pytest.raises(OSError):
        sock.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed anyway
    with pytest.raises(OSError):
        socket.getaddrinfo("example.com", 443)
    assert loopback_only.attempts == ["connect ('192.0.2.1', 80)", "getaddrinfo 'example.com'"]
    loopback_only.attempts.clear()


def test_generation_is_b64_json_without_response_format(
    litellm: ModuleType, server: LiveServer
) -> None:
    sent: list[httpx.Request] = []
    # LiteLLM's documented `client=` (an OpenAI client), only to see the request on the wire.
    http = httpx.Client(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=API_KEY, http_client=http, max_retries=0
    )
    with http:
        response = generate(
            litellm, server, seed=3, negative_prompt="blurry", steps=2, client=client
        )
    assert decoded(b64_of(response)).size == (SIZE, SIZE)
    (request,) = sent
    assert request.url.path == "/v1/images/generations"
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    body = json.loads(request.content)
    # LiteLLM 1.110 cannot send response_format for openai/<custom> models: the server's
    # default is what its users get.
    assert "response_format" not in body
    assert body["model"] == "tiny-sdxl"
    assert (body["seed"], body["negative_prompt"], body["steps"]) == (3, "blurry", 2)


def test_extra_kwargs_reach_the_pipeline(litellm: ModuleType, server: LiveServer) -> None:
    """The pixels LiteLLM gets are those of a direct request with the same seed, steps and
    negative prompt (had any of them been dropped, the request would differ); another seed
    gives other pixels."""
    extra = {"seed": 11, "steps": 2, "negative_prompt": "fog"}
    via_litellm = b64_of(generate(litellm, server, prompt="a windmill", **extra))
    body = {"model": "tiny-sdxl", "prompt": "a windmill", "size": f"{SIZE}x{SIZE}", **extra}
    assert direct(server, "/v1/images/generations", json=body) == via_litellm
    other_seed = b64_of(generate(litellm, server, prompt="a windmill", **{**extra, "seed": 12}))
    assert other_seed != via_litellm


def test_an_alias_name_works(litellm: ModuleType, server: LiveServer) -> None:
    alias = b64_of(generate(litellm, server, model="dall-e-2", seed=21, steps=2))
    assert decoded(alias).size == (SIZE, SIZE)
    assert alias == b64_of(generate(litellm, server, model="tiny-sdxl", seed=21, steps=2))


def test_image_edit(litellm: ModuleType, server: LiveServer, tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(png(gradient(SIZE, SIZE)))
    via_litellm = b64_of(edit(litellm, server, image, seed=5, steps=2))
    assert decoded(via_litellm).size == (SIZE, SIZE)
    # The seed and steps arrived: a direct edit with them gives the same pixels.
    fields = {"model": "tiny-sdxl", "prompt": "a lighthouse", "size": f"{SIZE}x{SIZE}"}
    form = {**fields, "seed": "5", "steps": "2", "response_format": "b64_json"}
    files = {"image": ("in.png", image.read_bytes(), "image/png")}
    assert direct(server, "/v1/images/edits", data=form, files=files) == via_litellm


def test_image_edit_with_a_mask(litellm: ModuleType, server: LiveServer, tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(png(gradient(SIZE, SIZE)))
    mask = tmp_path / "mask.png"
    mask.write_bytes(alpha_mask(SIZE, SIZE, BOX))
    with mask.open("rb") as mask_file:
        response = edit(litellm, server, image, mask=mask_file, seed=6, steps=2)
    out = decoded(b64_of(response)).convert("RGB")
    source = gradient(SIZE, SIZE)
    assert out.getpixel((2, 2)) == source.getpixel((2, 2))  # outside the transparent box
    inside = [(x, y) for x in range(20, 44, 4) for y in range(20, 44, 4)]
    assert any(out.getpixel(p) != source.getpixel(p) for p in inside)


def test_a_bad_field_surfaces_our_message(litellm: ModuleType, server: LiveServer) -> None:
    with pytest.raises(litellm.BadRequestError) as caught:
        litellm.image_generation(
            model="openai/tiny-sdxl",
            api_base=f"{server.url}/v1",
            api_key=API_KEY,
            prompt="x",
            size="1000x999",
        )
    assert caught.value.status_code == 400
    message = str(caught.value)
    assert "size" in message and "multiple of 8" in message and "999" in message


def test_a_wrong_key_is_litellms_authentication_error(
    litellm: ModuleType, server: LiveServer
) -> None:
    with pytest.raises(litellm.AuthenticationError) as caught:
        litellm.image_generation(
            model="openai/tiny-sdxl", api_base=f"{server.url}/v1", api_key="wrong", prompt="x"
        )
    assert "invalid API key" in str(caught.value)
