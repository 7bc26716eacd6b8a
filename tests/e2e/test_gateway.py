"""imagegen as a gateway and as a hybrid: the HTTP server serves hosted models through the same
OpenAI endpoints, and one imagegen reaches another (an on-prem GPU box) with seed, negative
prompt, steps and guidance intact."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from server.service import ImageRequest, ImageService
from server.settings import Settings
from tests.helpers_server import API_KEY, LiveServer, fresh_data_dir, live_server, tiny_settings
from tests.stubs.fixtures import FAST, live
from tests.stubs.stability_stub import StabilityStub

STABILITY_KEY = "k-stability-gw"
# The GPU box runs a real pipeline, on a loaded CI host as well: its timeout only stops a hung
# test (FAST's 2 s is for stubs that answer at once).
TO_THE_BOX = {**FAST, "timeout_s": 120.0}


@pytest.fixture(scope="module")
def stability() -> Iterator[StabilityStub]:
    with live(StabilityStub(api_key=STABILITY_KEY)) as stub:
        yield stub


@pytest.fixture(scope="module")
def gpu_box(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[LiveServer]:
    """The 'remote' imagegen server: a real one, serving tiny-sdxl behind an API key."""
    data = fresh_data_dir(tmp_path_factory.mktemp("gpu-box"), tiny_models_dir)
    with live_server(tiny_settings(data, api_keys=[API_KEY])) as server:
        yield server


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_gateway_serves_a_hosted_model_through_the_openai_endpoint(
    tmp_path: Path, tiny_models_dir: Path, stability: StabilityStub
) -> None:
    stability.state.reset()
    data = fresh_data_dir(tmp_path, tiny_models_dir)
    settings = tiny_settings(
        data,
        top={
            "providers": {
                "stability": {"base_url": stability.url, "api_key": STABILITY_KEY, **FAST}
            }
        },
    )
    with live_server(settings) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        first = client.images.generate(
            model="stability-core",
            prompt="a red fox",
            size="1024x1024",
            extra_body={"seed": 5, "negative_prompt": "fog"},
        )
        info = first.model_extra["imagegen"] if first.model_extra else {}
        assert info["provider"] == "stability" and info["cost_usd"] == pytest.approx(0.03)
        assert first.data and first.data[0].b64_json
        again = client.images.generate(
            model="stability-core",
            prompt="a red fox",
            size="1024x1024",
            extra_body={"seed": 5, "negative_prompt": "fog"},
        )
        assert again.model_extra and again.model_extra["imagegen"]["cached"] is True
        assert stability.state.count("generate") == 1
        form = stability.state.requests[0].form or {}
        assert form["negative_prompt"] == "fog" and form["seed"] == "5"
    assert stability.state.invalid == []


def test_local_only_server_refuses_hosted_models_over_http(
    tmp_path: Path, tiny_models_dir: Path, stability: StabilityStub
) -> None:
    stability.state.reset()
    data = fresh_data_dir(tmp_path, tiny_models_dir)
    settings = tiny_settings(
        data,
        top={
            "local_only": True,
            "providers": {"stability": {"base_url": stability.url, "api_key": STABILITY_KEY}},
        },
    )
    with live_server(settings) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.images.generate(model="stability-core", prompt="a red fox")
        assert "local-only" in str(info.value)
    assert stability.state.requests == []


def test_hybrid_remote_imagegen_keeps_every_diffusion_control(
    data_dir: Path, gpu_box: LiveServer
) -> None:
    """A laptop's imagegen sends work to the GPU box; the pixels are the ones the box's own
    pipeline makes for the same seed, negative prompt, steps, guidance and scheduler."""
    settings = Settings(
        data_dir=data_dir,
        providers={"imagegen": {"base_url": gpu_box.url, "api_key": API_KEY, **TO_THE_BOX}},
        models=[
            {
                "name": "gpu-tiny",
                "kind": "imagegen",
                "source": "imagegen",
                "provider_model": "tiny-sdxl",
                "defaults": {"width": 64, "height": 64},
            }
        ],
    )
    service = ImageService(settings)
    controls = {
        "prompt": "a castle",
        "negative_prompt": "towers",
        "seed": 31,
        "steps": 3,
        "guidance_scale": 6.5,
        "scheduler": "euler_a",
        "width": 64,
        "height": 64,
    }
    try:
        remote = asyncio.run(service.generate(ImageRequest(model="gpu-tiny", **controls)))
        local = asyncio.run(service.generate(ImageRequest(model="tiny-sdxl", **controls)))
    finally:
        service.close()
    assert remote.provider == "imagegen" and remote.dropped_params == ()
    assert remote.images[0].seed == 31
    assert np.abs(pixels(remote.images[0].data) - pixels(local.images[0].data)).max() <= 1
    # The box billed its GPU time; the laptop booked what the box reported.
    assert remote.cost_usd > 0
    box_stats = gpu_box.service.stats()
    assert box_stats["requests"] >= 1


def test_remote_imagegen_wrong_key_names_the_provider(data_dir: Path, gpu_box: LiveServer) -> None:
    from server import errors

    settings = Settings(
        data_dir=data_dir,
        providers={"imagegen": {"base_url": gpu_box.url, "api_key": "wrong-key", **TO_THE_BOX}},
    )
    service = ImageService(settings)
    try:
        with pytest.raises(errors.ProviderAuthError) as info:
            asyncio.run(
                service.generate(
                    ImageRequest(
                        prompt="a fox", model="remote-imagegen", seed=1, width=64, height=64
                    )
                )
            )
    finally:
        service.close()
    assert "imagegen" in info.value.message and "wrong-key" not in info.value.message


def test_b64_roundtrip_is_the_cached_file(gpu_box: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{gpu_box.url}/v1", api_key=API_KEY, max_retries=0)
    result = client.images.generate(
        model="tiny-sdxl", prompt="a kite", size="64x64", extra_body={"seed": 2, "steps": 1}
    )
    data = base64.b64decode(result.data[0].b64_json or "")
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    stored = gpu_box.service.read_file(sha)
    assert stored is not None and stored[0] == data
