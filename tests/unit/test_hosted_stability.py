"""StabilityBackend against a live stub of the v2beta Stable Image API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from email.utils import formatdate

import pytest

from models.base import (
    AuthError,
    BackendError,
    ContentFilteredError,
    InvalidParamsError,
    TransientBackendError,
)
from models.hosted.stability import nearest_aspect_ratio
from tests.stubs.common import Step, delay, reply, variant
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
from tests.stubs.stability_stub import StabilityStub, content_moderation

KEY = "sk-test-stability-good"


@pytest.fixture(scope="module")
def stub() -> Iterator[StabilityStub]:
    with live(StabilityStub(api_key=KEY)) as served:
        yield served


@pytest.fixture(autouse=True)
def clean(stub: StabilityStub) -> Iterator[None]:
    stub.state.reset()
    yield
    assert stub.state.invalid == [], "a request broke the Stability wire contract"


def test_success_is_multipart_json_and_seeded(stub: StabilityStub) -> None:
    b = backend("stability-core", config("stability", stub.url, KEY))
    p = params("stability-core", negative_prompt="blurry", output_format="webp")
    result = run(generate_once(b, p))
    (image,) = result.images
    assert (image.seed, image.format, image.width, image.height) == (42, "webp", 1024, 1024)
    assert result.deterministic is True
    assert result.dropped_params == () and result.notices == ()
    assert result.cost_usd == pytest.approx(0.03)  # Core: 3 credits
    (request,) = stub.state.requests
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert request.headers["accept"] == "application/json"
    assert request.path == "/v2beta/stable-image/generate/core"
    assert request.form == {
        "prompt": "a red fox in the snow",
        "negative_prompt": "blurry",
        "aspect_ratio": "1:1",
        "seed": "42",
        "output_format": "webp",
    }


def test_seeded_repeat_gives_identical_bytes(stub: StabilityStub) -> None:
    cfg = config("stability", stub.url, KEY)
    first = run(generate_once(backend("stability-core", cfg), params("stability-core")))
    second = run(generate_once(backend("stability-core", cfg), params("stability-core")))
    assert first.images[0].data == second.images[0].data


def test_sd3_sends_model_and_cfg_scale_and_n_calls(stub: StabilityStub) -> None:
    b = backend("stability-sd3.5-large", config("stability", stub.url, KEY))
    p = params("stability-sd3.5-large", n=3, seed=7, guidance_scale=4.5, steps=20)
    result = run(generate_once(b, p))
    assert sorted(i.seed for i in result.images) == [7, 8, 9]
    assert result.cost_usd == pytest.approx(3 * 0.065)
    assert result.dropped_params == ("steps",)
    forms = sorted((r.form or {} for r in stub.state.requests), key=lambda f: f["seed"])
    assert [f["seed"] for f in forms] == ["7", "8", "9"]
    assert all(f["model"] == "sd3.5-large" and f["cfg_scale"] == "4.5" for f in forms)
    assert all(r.path.endswith("/generate/sd3") for r in stub.state.requests)


def test_size_maps_to_the_nearest_aspect_ratio_and_says_so(stub: StabilityStub) -> None:
    b = backend("stability-ultra", config("stability", stub.url, KEY))
    result = run(generate_once(b, params("stability-ultra", width=1344, height=768)))
    assert stub.state.requests[0].form is not None
    assert stub.state.requests[0].form["aspect_ratio"] == "16:9"
    assert set(result.dropped_params) == {"width", "height"}
    assert "1344x768 was sent as aspect_ratio 16:9" in result.notices[0]


@pytest.mark.parametrize(
    ("size", "ratio", "exact"),
    [
        ((1024, 1024), "1:1", True),
        ((1920, 1080), "16:9", True),
        ((832, 1216), "2:3", False),
        ((2560, 1080), "21:9", False),
        ((500, 2000), "9:21", False),
        ((1000, 800), "5:4", True),
    ],
)
def test_nearest_aspect_ratio(size: tuple[int, int], ratio: str, exact: bool) -> None:
    assert nearest_aspect_ratio(*size) == (ratio, exact)


def test_429_waits_for_retry_after_then_succeeds(stub: StabilityStub) -> None:
    stub.state.script(
        "generate",
        reply(429, {"id": "x", "name": "rate_limit_exceeded", "errors": ["slow"]}, retry_after="2"),
    )
    sleep = RecordingSleep()
    result = run(
        generate_once(
            backend("stability-core", config("stability", stub.url, KEY), sleep),
            params("stability-core"),
        )
    )
    assert len(result.images) == 1
    assert sleep.waits == [2.0]
    assert stub.state.count("generate") == 2


def test_retry_after_as_http_date(stub: StabilityStub) -> None:
    when = formatdate(time.time() + 3, usegmt=True)
    stub.state.script(
        "generate", reply(503, {"id": "x", "name": "busy", "errors": []}, retry_after=when)
    )
    sleep = RecordingSleep()
    run(
        generate_once(
            backend("stability-core", config("stability", stub.url, KEY), sleep),
            params("stability-core"),
        )
    )
    assert len(sleep.waits) == 1 and 1.0 <= sleep.waits[0] <= 3.0


def test_500_then_success(stub: StabilityStub) -> None:
    stub.state.script("generate", reply(500, {"id": "x", "name": "internal_error", "errors": []}))
    sleep = RecordingSleep()
    result = run(
        generate_once(
            backend("stability-core", config("stability", stub.url, KEY), sleep),
            params("stability-core"),
        )
    )
    assert len(result.images) == 1
    assert sleep.waits == [0.01]


def test_timeout_is_transient(stub: StabilityStub) -> None:
    stub.state.script("generate", delay(1.0), delay(1.0))
    b = backend("stability-core", config("stability", stub.url, KEY, timeout_s=0.25, max_retries=1))
    with pytest.raises(TransientBackendError, match="after 2 attempt"):
        run(generate_once(b, params("stability-core")))
    assert stub.state.count("generate") == 2


def test_filtered_200_is_content_filtered_and_charged(stub: StabilityStub) -> None:
    stub.state.script("generate", variant("filtered"))
    with pytest.raises(ContentFilteredError) as caught:
        run(
            generate_once(
                backend("stability-ultra", config("stability", stub.url, KEY)),
                params("stability-ultra"),
            )
        )
    assert "CONTENT_FILTERED" in caught.value.message
    assert caught.value.charged_usd == pytest.approx(0.08)
    assert stub.state.count("generate") == 1


def test_moderation_403_is_content_filtered_and_free(stub: StabilityStub) -> None:
    stub.state.script("generate", reply(403, content_moderation()))
    with pytest.raises(ContentFilteredError) as caught:
        run(
            generate_once(
                backend("stability-core", config("stability", stub.url, KEY)),
                params("stability-core"),
            )
        )
    assert "content_moderation" in caught.value.message
    assert caught.value.charged_usd == 0.0
    assert stub.state.count("generate") == 1


def test_one_filtered_image_of_three_books_what_the_others_cost(stub: StabilityStub) -> None:
    stub.state.script("generate", variant("filtered"))
    with pytest.raises(ContentFilteredError) as caught:
        run(
            generate_once(
                backend("stability-core", config("stability", stub.url, KEY)),
                params("stability-core", n=3),
            )
        )
    assert caught.value.charged_usd == pytest.approx(3 * 0.03)
    assert stub.state.count("generate") == 3


def test_a_later_image_failing_raises_with_what_the_others_were_billed(
    stub: StabilityStub,
) -> None:
    # The 2nd of 3 calls is refused for credits (402, not retried); the 1st and 3rd made
    # images that were paid for: the error carries them, so the service can book them.
    stub.state.script("generate", Step(), reply(402, {"name": "payment_required"}), Step())
    b = backend("stability-core", config("stability", stub.url, KEY))
    with pytest.raises(BackendError, match="payment required") as caught:
        run(generate_once(b, params("stability-core", n=3)))
    assert caught.value.charged_usd == pytest.approx(2 * 0.03)
    assert stub.state.count("generate") == 3


def test_progress_moves_as_each_image_completes(stub: StabilityStub) -> None:
    events = RecordingEvents()
    b = backend("stability-core", config("stability", stub.url, KEY))
    run(generate_once(b, params("stability-core", n=3), events=events))
    assert events.seen[0] == ("started", ())
    assert events.steps == [(33, 100), (66, 100), (100, 100)]


def test_bad_key_is_an_auth_error(stub: StabilityStub) -> None:
    bad = "sk-stability-wrong-key-987"
    with pytest.raises(AuthError) as caught:
        run(
            generate_once(
                backend("stability-core", config("stability", stub.url, bad)),
                params("stability-core"),
            )
        )
    assert str(caught.value) == (
        "stability: the API key was rejected (401); set providers.stability.api_key / "
        "IMAGEGEN_PROVIDERS__STABILITY__API_KEY"
    )
    assert stub.state.count("generate") == 1


def test_seed_out_of_range(stub: StabilityStub) -> None:
    b = backend("stability-core", config("stability", stub.url, KEY))
    with pytest.raises(InvalidParamsError) as caught:
        b.resolve(params("stability-core", seed=4_294_967_294, n=2))
    assert caught.value.param == "seed"


def test_seed_zero_is_random_there_and_reported(stub: StabilityStub) -> None:
    result = run(
        generate_once(
            backend("stability-core", config("stability", stub.url, KEY)),
            params("stability-core", seed=0),
        )
    )
    assert result.deterministic is False
    assert result.images[0].seed not in (None, 0)  # the seed Stability actually used
    assert any("seed 0" in n for n in result.notices)


# ------------------------------------------------------------------ image inputs


def test_sd3_img2img_sends_mode_image_and_strength(stub: StabilityStub) -> None:
    image = input_image(1216, 832)
    b = backend("stability-sd3.5-large", config("stability", stub.url, KEY))
    p = params("stability-sd3.5-large", width=1216, height=832, images=(image,), strength=0.35)
    result = run(generate_once(b, p))
    (out,) = result.images
    assert (out.width, out.height) == (1216, 832)  # the input's size, no aspect-ratio mapping
    assert result.notices == () and "width" not in result.dropped_params
    assert result.cost_usd == pytest.approx(0.065)  # the model's own price
    (request,) = stub.state.requests
    assert request.path == "/v2beta/stable-image/generate/sd3"
    assert request.form == {
        "prompt": "a red fox in the snow",
        "seed": "42",
        "output_format": "png",
        "strength": "0.35",
        "mode": "image-to-image",
        "model": "sd3.5-large",
    }
    assert request.files == {"image": [image.data]}


def test_ultra_img2img_takes_the_default_strength(stub: StabilityStub) -> None:
    b = backend("stability-ultra", config("stability", stub.url, KEY))
    run(generate_once(b, params("stability-ultra", images=(input_image(1024, 1024),))))
    (request,) = stub.state.requests
    assert request.form is not None
    assert request.form["strength"] == "0.75" and "mode" not in request.form


def test_strength_changes_what_is_asked(stub: StabilityStub) -> None:
    b = backend("stability-ultra", config("stability", stub.url, KEY))
    image = input_image(1024, 1024)
    low = run(generate_once(b, params("stability-ultra", images=(image,), strength=0.2)))
    high = run(generate_once(b, params("stability-ultra", images=(image,), strength=0.9)))
    assert low.images[0].data != high.images[0].data


def test_inpaint_sends_image_and_mask_as_files(stub: StabilityStub) -> None:
    image = input_image(1024, 1024)
    mask = mask_image(1024, 1024, (100, 100, 300, 300))
    b = backend("stability-inpaint", config("stability", stub.url, KEY))
    p = params(
        "stability-inpaint",
        images=(image,),
        mask=mask,
        strength=0.5,
        negative_prompt="blurry",
        guidance_scale=5.0,
    )
    result = run(generate_once(b, p))
    assert (result.images[0].width, result.images[0].height) == (1024, 1024)
    assert set(result.dropped_params) == {"strength", "guidance_scale"}
    assert result.cost_usd == pytest.approx(0.05)
    (request,) = stub.state.requests
    assert request.path == "/v2beta/stable-image/edit/inpaint"
    # Stability's mask is white = repaint, as ours: the bytes go unchanged.
    assert request.files == {"image": [image.data], "mask": [mask.data]}
    assert request.form == {
        "prompt": "a red fox in the snow",
        "seed": "42",
        "output_format": "png",
        "negative_prompt": "blurry",
    }


def test_inpaint_filtered_is_content_filtered(stub: StabilityStub) -> None:
    stub.state.script("edit", variant("filtered"))
    mask = mask_image(1024, 1024, (0, 0, 9, 9))
    p = params("stability-inpaint", images=(input_image(1024, 1024),), mask=mask)
    with pytest.raises(ContentFilteredError):
        run(generate_once(backend("stability-inpaint", config("stability", stub.url, KEY)), p))


def test_unsupported_answers_per_endpoint(stub: StabilityStub) -> None:
    image, mask = input_image(1024, 1024), mask_image(1024, 1024, (0, 0, 9, 9))
    cfg = config("stability", stub.url, KEY)
    core = backend("stability-core", cfg)
    reason = core.unsupported(params("stability-core", images=(image,)))
    assert reason is not None and "'stability-core'" in reason and "no image-to-image" in reason
    sd3 = backend("stability-sd3.5-large", cfg)
    assert sd3.unsupported(params("stability-sd3.5-large", images=(image,))) is None
    reason = sd3.unsupported(params("stability-sd3.5-large", images=(image,), mask=mask))
    assert reason is not None and "does not take a mask" in reason and "stability-inpaint" in reason
    two = sd3.unsupported(params("stability-sd3.5-large", images=(image, image)))
    assert two == "model 'stability-sd3.5-large' takes at most 1 input image, got 2"
    inpaint = backend("stability-inpaint", cfg)
    assert inpaint.unsupported(params("stability-inpaint", images=(image,), mask=mask)) is None
    for p in (params("stability-inpaint"), params("stability-inpaint", images=(image,))):
        assert "needs one image and a mask" in (inpaint.unsupported(p) or "")
    # A refused edit sends nothing.
    with pytest.raises(InvalidParamsError):
        run(generate_once(core, params("stability-core", images=(image,))))
    assert stub.state.requests == []
