"""RemoteImagegenBackend against a live stub of another imagegen server's images API."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest

from models.base import (
    AuthError,
    ContentFilteredError,
    InvalidParamsError,
    TransientBackendError,
)
from tests.stubs.common import alpha_as_white_mask, delay, reply
from tests.stubs.fixtures import (
    RecordingEvents,
    RecordingSleep,
    backend,
    config,
    generate_once,
    input_image,
    live,
    mask_image,
    params,
    run,
)
from tests.stubs.imagegen_stub import REMOTE_PRESET_SUFFIX, ImagegenStub

KEY = "ig-test-good"


@pytest.fixture(scope="module")
def stub() -> Iterator[ImagegenStub]:
    with live(ImagegenStub(api_key=KEY)) as served:
        yield served


@pytest.fixture(autouse=True)
def clean(stub: ImagegenStub) -> Iterator[None]:
    stub.state.reset()
    yield
    assert stub.state.invalid == [], "a request broke imagegen's own API contract"


def envelope(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def test_extension_fields_travel_and_seeds_come_back(stub: ImagegenStub) -> None:
    b = backend("remote-imagegen", config("imagegen", stub.url, KEY))
    p = params(
        "remote-imagegen",
        n=2,
        seed=11,
        width=512,
        height=768,
        negative_prompt="blurry",
        steps=20,
        guidance_scale=6.5,
        scheduler="euler",
    )
    result = run(generate_once(b, p))
    assert [(i.seed, i.width, i.height) for i in result.images] == [(11, 512, 768), (12, 512, 768)]
    assert result.cost_usd == pytest.approx(0.0008)
    assert result.gpu_seconds == 0.0  # the remote's GPU time is already inside its cost
    assert result.deterministic is True and result.dropped_params == ()
    (request,) = stub.state.requests
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.json == {
        "model": "sdxl",
        "prompt": "a red fox in the snow",
        "n": 2,
        "size": "512x768",
        "seed": 11,
        "output_format": "png",
        "response_format": "b64_json",
        "negative_prompt": "blurry",
        "steps": 20,
        "guidance_scale": 6.5,
        "scheduler": "euler",
    }


def test_the_remote_revised_prompt_is_carried(stub: ImagegenStub) -> None:
    events = RecordingEvents()
    b = backend("remote-imagegen", config("imagegen", stub.url, KEY))
    result = run(generate_once(b, params("remote-imagegen"), events=events))
    assert result.revised_prompt == f"a red fox in the snow, {REMOTE_PRESET_SUFFIX}"
    assert events.seen == [("started", ()), ("progress", (100, 100))]


def test_seeded_repeat_is_identical(stub: ImagegenStub) -> None:
    cfg = config("imagegen", stub.url, KEY)
    first = run(generate_once(backend("remote-imagegen", cfg), params("remote-imagegen")))
    again = run(generate_once(backend("remote-imagegen", cfg), params("remote-imagegen")))
    assert first.images[0].data == again.images[0].data


def test_429_with_retry_after_is_retried(stub: ImagegenStub) -> None:
    stub.state.script(
        "generate",
        reply(429, envelope("server busy", "rate_limit_error", "queue_full"), retry_after="3"),
    )
    sleep = RecordingSleep()
    b = backend("remote-imagegen", config("imagegen", stub.url, KEY), sleep)
    result = run(generate_once(b, params("remote-imagegen")))
    assert len(result.images) == 1
    assert sleep.waits == [3.0]
    assert stub.state.count("generate") == 2


def test_503_then_success(stub: ImagegenStub) -> None:
    stub.state.script("generate", reply(503, envelope("draining", "server_error", "not_ready")))
    sleep = RecordingSleep()
    b = backend("remote-imagegen", config("imagegen", stub.url, KEY), sleep)
    assert len(run(generate_once(b, params("remote-imagegen"))).images) == 1
    assert sleep.waits == [0.01]


def test_timeout_is_transient(stub: ImagegenStub) -> None:
    stub.state.script("generate", delay(1.0), delay(1.0))
    b = backend("remote-imagegen", config("imagegen", stub.url, KEY, timeout_s=0.25, max_retries=1))
    with pytest.raises(TransientBackendError):
        run(generate_once(b, params("remote-imagegen")))
    assert stub.state.count("generate") == 2


def test_content_policy_violation_is_content_filtered(stub: ImagegenStub) -> None:
    stub.state.script(
        "generate",
        reply(
            400,
            envelope(
                "blocked by policy", "invalid_request_error", "content_policy_violation", "prompt"
            ),
        ),
    )
    with pytest.raises(ContentFilteredError, match="content_policy_violation"):
        run(
            generate_once(
                backend("remote-imagegen", config("imagegen", stub.url, KEY)),
                params("remote-imagegen"),
            )
        )
    assert stub.state.count("generate") == 1


def test_unknown_remote_model(stub: ImagegenStub) -> None:
    stub.models = {"flux-dev"}
    try:
        with pytest.raises(InvalidParamsError) as caught:
            run(
                generate_once(
                    backend("remote-imagegen", config("imagegen", stub.url, KEY)),
                    params("remote-imagegen"),
                )
            )
    finally:
        stub.models = {"sdxl"}
    assert caught.value.param == "model"
    assert "provider_model" in caught.value.message


def test_bad_key_is_an_auth_error(stub: ImagegenStub) -> None:
    bad = "ig-wrong-key-31337"
    with pytest.raises(AuthError) as caught:
        run(
            generate_once(
                backend("remote-imagegen", config("imagegen", stub.url, bad)),
                params("remote-imagegen"),
            )
        )
    assert str(caught.value).startswith("imagegen: the API key was rejected (401)")
    assert "IMAGEGEN_PROVIDERS__IMAGEGEN__API_KEY" in str(caught.value)
    assert bad not in str(caught.value)


# ------------------------------------------------------------------ edits (/v1/images/edits)


def test_an_edit_is_forwarded_as_multipart_with_the_extension_fields(stub: ImagegenStub) -> None:
    image = input_image(512, 768)
    mask = mask_image(512, 768, (20, 20, 120, 120))
    p = params(
        "remote-imagegen",
        width=512,
        height=768,
        n=2,
        seed=11,
        images=(image,),
        mask=mask,
        strength=0.6,
        negative_prompt="blurry",
        steps=20,
        guidance_scale=6.5,
        style="vivid",
        mask_blur=4,
    )
    result = run(generate_once(backend("remote-imagegen", config("imagegen", stub.url, KEY)), p))
    assert [(i.seed, i.width, i.height) for i in result.images] == [(11, 512, 768), (12, 512, 768)]
    # style is a generation field; mask_blur is not a field of the edits form.
    assert set(result.dropped_params) == {"style", "mask_blur"}
    assert result.deterministic is True
    (request,) = stub.state.requests
    assert request.path == "/v1/images/edits"
    assert request.form == {
        "model": "sdxl",
        "prompt": "a red fox in the snow",
        "n": "2",
        "size": "512x768",
        "seed": "11",
        "output_format": "png",
        "response_format": "b64_json",
        "negative_prompt": "blurry",
        "steps": "20",
        "guidance_scale": "6.5",
        "strength": "0.6",
    }
    assert request.files["image"] == [image.data]
    # The mask travels in OpenAI's convention; the remote reads it back to exactly ours.
    from PIL import Image

    with Image.open(io.BytesIO(mask.data)) as ours:
        assert alpha_as_white_mask(request.files["mask"][0]) == ours.tobytes()


def test_several_images_go_as_image_brackets(stub: ImagegenStub) -> None:
    images = (input_image(512, 512), input_image(512, 512, (1, 2, 3)))
    p = params("remote-imagegen", width=512, height=512, images=images)
    run(generate_once(backend("remote-imagegen", config("imagegen", stub.url, KEY)), p))
    (request,) = stub.state.requests
    assert request.files == {"image[]": [image.data for image in images]}


def test_the_remote_refusing_an_edit_is_invalid_params_naming_it(stub: ImagegenStub) -> None:
    refusal = envelope(
        "model 'sdxl-turbo' does not take a mask", "invalid_request_error", "unsupported", "mask"
    )
    stub.state.script("edit", reply(400, refusal))
    mask = mask_image(512, 512, (0, 0, 9, 9))
    p = params("remote-imagegen", width=512, height=512, images=(input_image(512, 512),), mask=mask)
    with pytest.raises(InvalidParamsError, match="does not take a mask") as caught:
        run(generate_once(backend("remote-imagegen", config("imagegen", stub.url, KEY)), p))
    assert caught.value.param == "mask"
    assert stub.state.count("edit") == 1


def test_unsupported_only_refuses_lora_and_too_many_images(stub: ImagegenStub) -> None:
    from models.base import LoraRef

    b = backend("remote-imagegen", config("imagegen", stub.url, KEY))
    image = input_image(512, 512)
    assert b.unsupported(params("remote-imagegen", images=(image,) * 16)) is None
    assert "at most 16" in (b.unsupported(params("remote-imagegen", images=(image,) * 17)) or "")
    lora = params("remote-imagegen", loras=(LoraRef("style", 1.0, "0" * 64),))
    assert "takes no LoRA adapters" in (b.unsupported(lora) or "")
