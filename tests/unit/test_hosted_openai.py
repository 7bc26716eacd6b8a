"""OpenAIImagesBackend through the real `openai` SDK against a live stub of the Images API."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from models.base import (
    AuthError,
    ContentFilteredError,
    InvalidParamsError,
    PromptTooLongError,
    TransientBackendError,
)
from tests.stubs.common import alpha_as_white_mask, delay, reply, require_specs, variant
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
    spec,
)
from tests.stubs.openai_stub import (
    OpenAIStub,
    content_policy_violation,
    moderation_blocked,
)

KEY = "sk-test-openai-good"


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    require_specs()
    with live(OpenAIStub(api_key=KEY, models=("gpt-image-2", "dall-e-3", "dall-e-2"))) as served:
        yield served


@pytest.fixture(autouse=True)
def clean(stub: OpenAIStub) -> Iterator[None]:
    stub.state.reset()
    stub.models = {"gpt-image-2", "dall-e-3", "dall-e-2"}
    yield
    assert stub.state.invalid == [], "a request broke the OpenAI wire contract"


def test_success_through_the_sdk(stub: OpenAIStub) -> None:
    b = backend("gpt-image-2", config("openai", stub.url, KEY))
    p = params("gpt-image-2", n=2, quality="high", negative_prompt="blurry", steps=30)
    result = run(generate_once(b, p))

    assert result.provider == "openai"
    assert [(i.width, i.height, i.format, i.seed) for i in result.images] == [
        (1024, 1024, "png", None)
    ] * 2
    assert result.images[0].data.startswith(b"\x89PNG")
    assert set(result.dropped_params) == {"seed", "negative_prompt", "steps"}
    assert result.deterministic is False
    # usage: 50 text in at $5, 10 image in at $8, 8320 image out at $30 per 1M tokens.
    assert result.cost_usd == pytest.approx((50 * 5 + 10 * 8 + 8320 * 30) / 1e6)
    (request,) = stub.state.requests
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["user-agent"].startswith("AsyncOpenAI/Python")
    assert request.json == {
        "prompt": "a red fox in the snow",
        "model": "gpt-image-2",
        "n": 2,
        "size": "1024x1024",
        "output_format": "png",
        "quality": "high",
    }


def test_base_url_may_carry_v1(stub: OpenAIStub) -> None:
    b = backend("gpt-image-2", config("openai", f"{stub.url}/v1", KEY))
    result = run(generate_once(b, params("gpt-image-2", width=1536, height=864)))
    assert (result.images[0].width, result.images[0].height) == (1536, 864)


def test_429_waits_for_retry_after_then_succeeds(stub: OpenAIStub) -> None:
    body = {"error": {"message": "Rate limit", "type": "requests", "param": None, "code": None}}
    stub.state.script("generate", reply(429, body, retry_after="1"))
    sleep = RecordingSleep()
    result = run(
        generate_once(
            backend("gpt-image-2", config("openai", stub.url, KEY), sleep), params("gpt-image-2")
        )
    )
    assert len(result.images) == 1
    assert sleep.waits == [1.0]
    assert stub.state.count("generate") == 2


def test_retry_after_ms_is_really_waited(stub: OpenAIStub) -> None:
    body = {
        "error": {"message": "slow down", "type": "requests", "param": None, "code": "slow_down"}
    }
    stub.state.script("generate", reply(429, body, retry_after_ms="300", retry_after="20"))
    sleep = RecordingSleep(real=True)
    started = time.monotonic()
    run(
        generate_once(
            backend("gpt-image-2", config("openai", stub.url, KEY), sleep), params("gpt-image-2")
        )
    )
    assert sleep.waits == [0.3]
    assert time.monotonic() - started >= 0.3


def test_500_then_success(stub: OpenAIStub) -> None:
    body = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    stub.state.script("generate", reply(500, body))
    sleep = RecordingSleep()
    result = run(
        generate_once(
            backend("gpt-image-2", config("openai", stub.url, KEY), sleep), params("gpt-image-2")
        )
    )
    assert len(result.images) == 1
    assert sleep.waits == [0.01]  # backoff_base_s * 2**0
    assert stub.state.count("generate") == 2


def test_503_every_time_gives_transient_error_after_the_retries(stub: OpenAIStub) -> None:
    body = {
        "error": {
            "message": "overloaded",
            "type": "server_error",
            "param": None,
            "code": "server_is_overloaded",
        }
    }
    stub.state.script("generate", *[reply(503, body)] * 3)
    sleep = RecordingSleep()
    b = backend("gpt-image-2", config("openai", stub.url, KEY, max_retries=2), sleep)
    with pytest.raises(TransientBackendError, match="after 3 attempt"):
        run(generate_once(b, params("gpt-image-2")))
    assert stub.state.count("generate") == 3
    assert sleep.waits == [0.01, 0.02]


def test_retry_after_over_the_cap_fails_at_once(stub: OpenAIStub) -> None:
    body = {"error": {"message": "Rate limit", "type": "requests", "param": None, "code": None}}
    stub.state.script("generate", reply(429, body, retry_after="60"))
    sleep = RecordingSleep()
    with pytest.raises(TransientBackendError, match="retry_cap_s"):
        run(
            generate_once(
                backend("gpt-image-2", config("openai", stub.url, KEY), sleep),
                params("gpt-image-2"),
            )
        )
    assert sleep.waits == []
    assert stub.state.count("generate") == 1


def test_timeout_is_transient(stub: OpenAIStub) -> None:
    stub.state.script("generate", delay(1.0), delay(1.0))
    b = backend("gpt-image-2", config("openai", stub.url, KEY, timeout_s=0.25, max_retries=1))
    # The error names the client's own timeout: neither attempt waited for the stub's answer.
    with pytest.raises(TransientBackendError, match=r"no answer within 0\.25 s"):
        run(generate_once(b, params("gpt-image-2")))
    assert stub.state.count("generate") == 2


@pytest.mark.parametrize("answer", [content_policy_violation(), moderation_blocked()])
def test_moderation_is_content_filtered_and_not_retried(
    stub: OpenAIStub, answer: dict[str, Any]
) -> None:
    stub.state.script("generate", reply(400, answer))
    with pytest.raises(ContentFilteredError) as caught:
        run(
            generate_once(
                backend("gpt-image-2", config("openai", stub.url, KEY)), params("gpt-image-2")
            )
        )
    assert answer["error"]["code"] in caught.value.message
    assert caught.value.charged_usd == 0.0
    assert stub.state.count("generate") == 1


def test_insufficient_quota_is_not_retried(stub: OpenAIStub) -> None:
    body = {
        "error": {
            "message": "quota",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    stub.state.script("generate", reply(429, body))
    with pytest.raises(TransientBackendError, match="out of quota"):
        run(
            generate_once(
                backend("gpt-image-2", config("openai", stub.url, KEY)), params("gpt-image-2")
            )
        )
    assert stub.state.count("generate") == 1


def test_bad_key_is_an_auth_error_that_names_the_setting_not_the_key(stub: OpenAIStub) -> None:
    bad = "sk-wrong-key-0123456789"
    with pytest.raises(AuthError) as caught:
        run(
            generate_once(
                backend("gpt-image-2", config("openai", stub.url, bad)), params("gpt-image-2")
            )
        )
    message = str(caught.value)
    assert message.startswith("openai: the API key was rejected (401)")
    assert "providers.openai.api_key" in message
    assert "IMAGEGEN_PROVIDERS__OPENAI__API_KEY" in message
    assert bad not in message and "6789" not in message
    assert stub.state.count("generate") == 1


def test_missing_key_fails_before_any_request(stub: OpenAIStub) -> None:
    with pytest.raises(AuthError, match="no API key is configured"):
        run(
            generate_once(
                backend("gpt-image-2", config("openai", stub.url, None)), params("gpt-image-2")
            )
        )
    assert stub.state.requests == []


@pytest.mark.parametrize("size", [(1000, 1008), (1024, 4096), (3840, 2176), (496, 1600)])
def test_gpt_image_2_size_rules(stub: OpenAIStub, size: tuple[int, int]) -> None:
    b = backend("gpt-image-2", config("openai", stub.url, KEY))
    with pytest.raises(InvalidParamsError) as caught:
        b.resolve(params("gpt-image-2", width=size[0], height=size[1]))
    assert caught.value.param == "size"
    assert f"'{size[0]}x{size[1]}'" in caught.value.message


def test_gpt_image_2_accepts_its_largest_and_most_oblong_sizes(stub: OpenAIStub) -> None:
    b = backend("gpt-image-2", config("openai", stub.url, KEY))
    for width, height in ((3840, 2160), (2160, 3840), (528, 1584), (1584, 528)):
        b.resolve(params("gpt-image-2", width=width, height=height))


def test_prompt_limit(stub: OpenAIStub) -> None:
    b = backend("gpt-image-2", config("openai", stub.url, KEY))
    b.check_prompt("x" * 32000)
    with pytest.raises(PromptTooLongError):
        b.check_prompt("x" * 32001)


# ------------------------------------------------------------------ dall-e-3 (retired)


def test_dall_e_3_works_where_it_is_offered(stub: OpenAIStub) -> None:
    b = backend("dall-e-3", config("openai", stub.url, KEY))
    p = params("dall-e-3", n=2, quality="hd", style="natural", width=1792, height=1024)
    result = run(generate_once(b, p))
    assert len(result.images) == 2
    assert result.revised_prompt == "A detailed picture of a red fox in the snow"
    assert result.cost_usd == pytest.approx(2 * 0.12)
    bodies = [r.json for r in stub.state.requests]
    assert len(bodies) == 2
    assert all(body["n"] == 1 and body["style"] == "natural" for body in bodies)
    assert all(body["response_format"] == "b64_json" for body in bodies)


def test_a_model_the_server_lacks_names_the_catalogue_entry(stub: OpenAIStub) -> None:
    # Retired models are the router's (tests/test_router.py); a server without a model the
    # catalogue expects there is a 400 naming what to check.
    stub.models = {"dall-e-3"}
    with pytest.raises(InvalidParamsError) as caught:
        run(
            generate_once(
                backend("gpt-image-2", config("openai", stub.url, KEY)), params("gpt-image-2")
            )
        )
    assert caught.value.param == "model"
    assert "'gpt-image-2' is not offered by 127.0.0.1" in caught.value.message
    assert "provider_model" in caught.value.message
    assert stub.state.count("generate") == 1


def test_dall_e_qualities_are_sent_as_gpt_image_qualities(stub: OpenAIStub) -> None:
    # What a retired dall-e-3 request served by gpt-image-2 (the router's mapping) relies on.
    p = params("gpt-image-2", quality="hd", style="vivid")
    result = run(generate_once(backend("gpt-image-2", config("openai", stub.url, KEY)), p))
    (request,) = stub.state.requests
    assert request.json["quality"] == "high" and "style" not in request.json
    assert "style" in result.dropped_params
    assert any("quality 'hd'" in n and "'high'" in n for n in result.notices)
    assert result.cost_usd is not None  # from usage


def test_gpt_image_revised_prompt_is_carried(stub: OpenAIStub) -> None:
    stub.state.script("generate", variant("revised"))
    result = run(
        generate_once(
            backend("gpt-image-2", config("openai", stub.url, KEY)), params("gpt-image-2")
        )
    )
    assert result.revised_prompt == "A detailed picture of a red fox in the snow"


def test_started_comes_before_the_request_and_progress_after(stub: OpenAIStub) -> None:
    events = RecordingEvents()
    b = backend("dall-e-3", config("openai", stub.url, KEY))
    run(generate_once(b, params("dall-e-3", n=2), events=events))
    assert events.seen[0] == ("started", ())
    assert events.steps == [(50, 100), (100, 100)]  # as each of the two calls completes


def test_dall_e_3_rejects_sizes_it_never_had(stub: OpenAIStub) -> None:
    b = backend("dall-e-3", config("openai", stub.url, KEY))
    with pytest.raises(InvalidParamsError) as caught:
        b.resolve(params("dall-e-3", width=1536, height=1024))
    assert caught.value.param == "size"


def test_an_injected_httpx_transport_reaches_the_sdk() -> None:
    import base64
    import json

    import httpx

    from tests.stubs.common import make_image

    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        image = base64.b64encode(make_image(16, 16, "x")).decode()
        return httpx.Response(200, json={"created": 1, "data": [{"b64_json": image}]})

    cfg = config("openai", "https://api.openai.com", KEY)
    b = backend("gpt-image-2", cfg, transport=httpx.MockTransport(handler))
    result = run(generate_once(b, params("gpt-image-2")))
    assert (result.images[0].width, result.cost_usd) == (16, None)  # no usage, no per-image price
    assert seen[0]["model"] == "gpt-image-2"


# ------------------------------------------------------------------ edits (/v1/images/edits)


def test_one_image_edit_goes_as_multipart_with_string_numbers(stub: OpenAIStub) -> None:
    image = input_image(1024, 1024)
    p = params(
        "gpt-image-2", n=2, quality="high", images=(image,), strength=0.4, input_fidelity="high"
    )
    result = run(generate_once(backend("gpt-image-2", config("openai", stub.url, KEY)), p))

    assert [(i.width, i.height, i.format) for i in result.images] == [(1024, 1024, "png")] * 2
    # The edits API edits by instruction: no strength knob to send it to.
    assert set(result.dropped_params) == {"seed", "strength"}
    # usage: 50 text + 1000 image tokens in, 8320 out.
    assert result.cost_usd == pytest.approx((50 * 5 + 1000 * 8 + 8320 * 30) / 1e6)
    (request,) = stub.state.requests
    assert request.route == "edit" and request.path == "/v1/images/edits"
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert request.form == {
        "prompt": "a red fox in the snow",
        "model": "gpt-image-2",
        "n": "2",
        "size": "1024x1024",
        "output_format": "png",
        "quality": "high",
        "input_fidelity": "high",
    }
    assert request.files == {"image": [image.data]}


def test_several_images_go_as_repeated_image_brackets(stub: OpenAIStub) -> None:
    images = tuple(input_image(1024, 1024, (i * 40, 10, 10)) for i in range(3))
    p = params("gpt-image-2", images=images)
    run(generate_once(backend("gpt-image-2", config("openai", stub.url, KEY)), p))
    (request,) = stub.state.requests
    assert request.files == {"image[]": [image.data for image in images]}


def test_the_mask_is_converted_to_transparent_is_edit(stub: OpenAIStub) -> None:
    image = input_image(1024, 1536)
    mask = mask_image(1024, 1536, (100, 200, 400, 600))
    p = params("gpt-image-2", width=1024, height=1536, images=(image,), mask=mask)
    result = run(generate_once(backend("gpt-image-2", config("openai", stub.url, KEY)), p))
    assert (result.images[0].width, result.images[0].height) == (1024, 1536)
    (request,) = stub.state.requests
    sent = request.files["mask"][0]
    from PIL import Image

    with Image.open(io.BytesIO(sent)) as img:
        assert img.mode == "RGBA"
        alpha = img.getchannel("A")
        assert alpha.getpixel((300, 400)) == 0  # inside the box: transparent, edited
        assert alpha.getpixel((10, 10)) == 255  # outside: opaque, kept
        assert alpha.getpixel((100, 200)) == 127  # the grey feather keeps its weight
    with Image.open(io.BytesIO(mask.data)) as ours:
        assert alpha_as_white_mask(sent) == ours.tobytes()  # exactly invertible


def test_an_edit_drops_what_the_edits_api_lacks(stub: OpenAIStub) -> None:
    mask = mask_image(1024, 1024, (0, 0, 10, 10))
    p = params(
        "gpt-image-2",
        images=(input_image(1024, 1024),),
        mask=mask,
        moderation="low",
        mask_blur=4,
        inpaint_area="masked",
    )
    result = run(generate_once(backend("gpt-image-2", config("openai", stub.url, KEY)), p))
    assert set(result.dropped_params) == {"seed", "moderation", "mask_blur", "inpaint_area"}
    assert "moderation" not in (stub.state.requests[0].form or {})


def test_edit_moderation_is_content_filtered(stub: OpenAIStub) -> None:
    stub.state.script("edit", reply(400, moderation_blocked()))
    p = params("gpt-image-2", images=(input_image(1024, 1024),))
    with pytest.raises(ContentFilteredError, match="moderation_blocked"):
        run(generate_once(backend("gpt-image-2", config("openai", stub.url, KEY)), p))
    assert stub.state.count("edit") == 1


def test_edit_429_is_retried(stub: OpenAIStub) -> None:
    body = {"error": {"message": "Rate limit", "type": "requests", "param": None, "code": None}}
    stub.state.script("edit", reply(429, body, retry_after="1"))
    sleep = RecordingSleep()
    p = params("gpt-image-2", images=(input_image(1024, 1024),))
    run(generate_once(backend("gpt-image-2", config("openai", stub.url, KEY), sleep), p))
    assert sleep.waits == [1.0] and stub.state.count("edit") == 2


def test_dall_e_2_edits_one_square_png(stub: OpenAIStub) -> None:
    from models.base import ModelSpec
    from models.hosted import make_hosted_backend

    dalle2 = ModelSpec(name="dall-e-2", kind="openai", source="openai", provider_model="dall-e-2")
    b = make_hosted_backend(dalle2, config("openai", stub.url, KEY))
    image = input_image(512, 512)
    p = params("dall-e-2", width=512, height=512, n=2, images=(image,), quality="high")
    result = run(generate_once(b, p))
    assert len(result.images) == 2 and "quality" in result.dropped_params
    (request,) = stub.state.requests
    assert request.form is not None
    assert request.form["response_format"] == "b64_json" and request.form["n"] == "2"
    assert "output_format" not in request.form

    wide = params("dall-e-2", width=512, height=512, images=(input_image(768, 512),))
    assert "square images only" in (b.unsupported(wide) or "")
    two = params("dall-e-2", width=512, height=512, images=(image, image))
    assert "at most 1 input image, got 2" in (b.unsupported(two) or "")


def test_unsupported_answers_per_model(stub: OpenAIStub) -> None:
    from models.base import LoraRef

    gpt = backend("gpt-image-2", config("openai", stub.url, KEY))
    image = input_image(1024, 1024)
    assert gpt.unsupported(params("gpt-image-2")) is None
    assert gpt.unsupported(params("gpt-image-2", images=(image,) * 16)) is None
    assert (
        gpt.unsupported(
            params("gpt-image-2", images=(image,), mask=mask_image(1024, 1024, (0, 0, 9, 9)))
        )
        is None
    )
    reason = gpt.unsupported(params("gpt-image-2", images=(image,) * 17))
    assert reason == "model 'gpt-image-2' takes at most 16 input images, got 17"
    lora = params("gpt-image-2", loras=(LoraRef("style", 0.8, "0" * 64),))
    assert "takes no LoRA adapters" in (gpt.unsupported(lora) or "")
    dalle3 = backend("dall-e-3", config("openai", stub.url, KEY))
    reason = dalle3.unsupported(params("dall-e-3", images=(image,)))
    assert reason is not None and "'dall-e-3'" in reason and "no edits endpoint" in reason


def test_an_unsupported_edit_is_refused_before_anything_is_sent(stub: OpenAIStub) -> None:
    b = backend("dall-e-3", config("openai", stub.url, KEY))
    with pytest.raises(InvalidParamsError) as caught:
        run(generate_once(b, params("dall-e-3", images=(input_image(1024, 1024),))))
    assert caught.value.param == "image"
    assert stub.state.requests == []


def test_input_fidelity_is_dropped_where_the_model_lacks_it(stub: OpenAIStub) -> None:
    from models.hosted import make_hosted_backend

    mini = replace(
        spec("gpt-image-1"),
        name="gpt-image-1-mini",
        provider_model="gpt-image-1-mini",
        replacement=None,
    )
    stub.models = {"gpt-image-1-mini", "gpt-image-2"}
    b = make_hosted_backend(mini, config("openai", stub.url, KEY))
    p = params("gpt-image-1-mini", images=(input_image(1024, 1024),), input_fidelity="high")
    result = run(generate_once(b, p))
    assert "input_fidelity" in result.dropped_params
    assert "input_fidelity" not in (stub.state.requests[0].form or {})
    # Text to image has no input to be faithful to.
    text = run(
        generate_once(
            backend("gpt-image-2", config("openai", stub.url, KEY)),
            params("gpt-image-2", input_fidelity="low"),
        )
    )
    assert "input_fidelity" in text.dropped_params
