"""BFLBackend against a live stub of the BFL API: submit, poll the returned URL, download."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from models.base import (
    AuthError,
    ContentFilteredError,
    InvalidParamsError,
    TransientBackendError,
)
from tests.stubs.bfl_stub import BFLStub
from tests.stubs.common import delay, reply, require_specs, variant
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

KEY = "bfl-test-good"


@pytest.fixture(scope="module")
def stub() -> Iterator[BFLStub]:
    require_specs()
    with live(BFLStub(api_key=KEY, pending_polls=2)) as served:
        yield served


@pytest.fixture(autouse=True)
def clean(stub: BFLStub) -> Iterator[None]:
    stub.state.reset()
    yield
    assert stub.state.invalid == [], "a request broke the BFL wire contract"


def test_submit_poll_download(stub: BFLStub) -> None:
    events = RecordingEvents()
    b = backend("flux-pro-1.1", config("bfl", stub.url, KEY))
    p = params("flux-pro-1.1", width=1024, height=768, negative_prompt="blurry", steps=10)
    result = run(generate_once(b, p, events=events))

    (image,) = result.images
    assert (image.width, image.height, image.format, image.seed) == (1024, 768, "png", 42)
    assert result.cost_usd == pytest.approx(0.04)  # the submit answer's 4 credits
    assert result.deterministic is True
    assert set(result.dropped_params) == {"negative_prompt", "steps"}
    (submit,) = stub.state.of("submit")
    assert submit.path == "/v1/flux-pro-1.1"
    assert submit.headers["x-key"] == KEY
    assert submit.json == {
        "prompt": "a red fox in the snow",
        "seed": 42,
        "output_format": "png",
        "width": 1024,
        "height": 768,
    }
    polls = stub.state.of("poll")
    assert len(polls) == 3 and all(p.path == "/eu/v1/get_result" for p in polls)
    assert stub.state.count("download") == 1
    assert events.seen[0] == ("started", ())
    assert events.steps[-1] == (100, 100)
    assert [s for s, _ in events.steps] == sorted(s for s, _ in events.steps)


def test_flux_dev_sends_steps_and_guidance(stub: BFLStub) -> None:
    b = backend("bfl-flux-dev", config("bfl", stub.url, KEY))
    p = b.resolve(params("bfl-flux-dev", output_format="jpeg"))
    result = run(generate_once(b, p))
    assert result.images[0].format == "jpeg"
    assert result.cost_usd == pytest.approx(0.025)
    body = stub.state.of("submit")[0].json
    assert body["steps"] == 28 and body["guidance"] == 3.0


def test_ultra_takes_an_aspect_ratio(stub: BFLStub) -> None:
    b = backend("flux-pro-1.1-ultra", config("bfl", stub.url, KEY))
    result = run(generate_once(b, params("flux-pro-1.1-ultra", width=1920, height=1080)))
    assert stub.state.of("submit")[0].json["aspect_ratio"] == "16:9"
    assert "aspect_ratio 16:9" in result.notices[0]


def test_n_tasks_with_consecutive_seeds(stub: BFLStub) -> None:
    b = backend("flux-2-pro", config("bfl", stub.url, KEY))
    result = run(generate_once(b, params("flux-2-pro", n=3, seed=100, width=1440, height=1440)))
    assert sorted(i.seed for i in result.images) == [100, 101, 102]
    assert result.cost_usd == pytest.approx(3 * 0.03)
    assert sorted(s.json["seed"] for s in stub.state.of("submit")) == [100, 101, 102]


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ("flux-pro-1.1", (1000, 1024)),
        ("flux-pro-1.1", (224, 256)),
        ("flux-pro-1.1", (1472, 1024)),
        ("flux-2-pro", (2048, 2064)),
        ("flux-2-pro", (1000, 1008)),
        ("flux-pro-1.1-ultra", (3000, 1000)),
    ],
)
def test_size_rules(stub: BFLStub, model: str, size: tuple[int, int]) -> None:
    b = backend(model, config("bfl", stub.url, KEY))
    with pytest.raises(InvalidParamsError) as caught:
        b.resolve(params(model, width=size[0], height=size[1]))
    assert caught.value.param == "size"


def test_submit_429_waits_for_retry_after(stub: BFLStub) -> None:
    stub.state.script("submit", reply(429, {"detail": "Too many active tasks"}, retry_after="1"))
    sleep = RecordingSleep()
    result = run(
        generate_once(
            backend("flux-pro-1.1", config("bfl", stub.url, KEY), sleep), params("flux-pro-1.1")
        )
    )
    assert len(result.images) == 1
    assert sleep.waits[0] == 1.0  # then the poll intervals
    assert stub.state.count("submit") == 2


def test_poll_500_then_success(stub: BFLStub) -> None:
    stub.state.script("poll", reply(500, {"detail": "Internal Server Error"}))
    result = run(
        generate_once(backend("flux-pro-1.1", config("bfl", stub.url, KEY)), params("flux-pro-1.1"))
    )
    assert len(result.images) == 1
    assert stub.state.count("submit") == 1


def test_submit_timeout_is_transient(stub: BFLStub) -> None:
    stub.state.script("submit", delay(1.0), delay(1.0))
    b = backend("flux-pro-1.1", config("bfl", stub.url, KEY, timeout_s=0.25, max_retries=1))
    with pytest.raises(TransientBackendError, match="no answer within"):
        run(generate_once(b, params("flux-pro-1.1")))
    assert stub.state.count("submit") == 2


def test_task_that_stays_pending_times_out(stub: BFLStub) -> None:
    stub.pending_polls = 10_000
    try:
        b = backend("flux-pro-1.1", config("bfl", stub.url, KEY, poll_timeout_s=0.2))
        with pytest.raises(TransientBackendError, match="still Pending"):
            run(generate_once(b, params("flux-pro-1.1")))
    finally:
        stub.pending_polls = 2


@pytest.mark.parametrize("status", ["Request Moderated", "Content Moderated"])
def test_moderation_is_content_filtered_with_the_charged_cost(stub: BFLStub, status: str) -> None:
    stub.state.script("task", variant(status))
    with pytest.raises(ContentFilteredError) as caught:
        run(
            generate_once(
                backend("flux-pro-1.1", config("bfl", stub.url, KEY)), params("flux-pro-1.1")
            )
        )
    assert status in caught.value.message
    assert caught.value.charged_usd == pytest.approx(0.04)
    assert stub.state.count("submit") == 1
    assert stub.state.count("download") == 0


@pytest.mark.parametrize("status", ["Error", "Task not found"])
def test_failed_task_is_transient(stub: BFLStub, status: str) -> None:
    stub.state.script("task", variant(status))
    with pytest.raises(TransientBackendError, match=status):
        run(
            generate_once(
                backend("flux-pro-1.1", config("bfl", stub.url, KEY)), params("flux-pro-1.1")
            )
        )
    assert stub.state.count("submit") == 1


def test_bad_key_is_a_403_auth_error(stub: BFLStub) -> None:
    bad = "bfl-wrong-key-555"
    with pytest.raises(AuthError) as caught:
        run(
            generate_once(
                backend("flux-pro-1.1", config("bfl", stub.url, bad)), params("flux-pro-1.1")
            )
        )
    message = str(caught.value)
    assert message.startswith("bfl: the API key was rejected (403)")
    assert "IMAGEGEN_PROVIDERS__BFL__API_KEY" in message and bad not in message
    assert stub.state.count("submit") == 1


def test_out_of_credits(stub: BFLStub) -> None:
    stub.state.script("submit", reply(402, {"detail": "Insufficient credits"}))
    with pytest.raises(Exception, match="402") as caught:
        run(
            generate_once(
                backend("flux-pro-1.1", config("bfl", stub.url, KEY)), params("flux-pro-1.1")
            )
        )
    assert not isinstance(caught.value, TransientBackendError)
    assert stub.state.count("submit") == 1


# ------------------------------------------------------------------ image inputs


def test_kontext_sends_the_image_as_base64_input_image(stub: BFLStub) -> None:
    image, second = input_image(1024, 768), input_image(512, 512, (200, 10, 10))
    b = backend("flux-kontext-pro", config("bfl", stub.url, KEY))
    p = params("flux-kontext-pro", width=1024, height=768, images=(image, second), strength=0.5)
    result = run(generate_once(b, p))
    assert result.cost_usd == pytest.approx(0.04)
    assert result.dropped_params == ("strength",)  # Kontext edits by instruction: no strength
    (submit,) = stub.state.of("submit")
    assert submit.path == "/v1/flux-kontext-pro"
    assert submit.json == {
        "prompt": "a red fox in the snow",
        "seed": 42,
        "output_format": "png",
        "aspect_ratio": "4:3",
        "input_image": base64.b64encode(image.data).decode(),
        "input_image_2": base64.b64encode(second.data).decode(),
    }


def test_kontext_max_without_an_image_is_text_to_image(stub: BFLStub) -> None:
    b = backend("flux-kontext-max", config("bfl", stub.url, KEY))
    result = run(generate_once(b, params("flux-kontext-max")))
    assert result.cost_usd == pytest.approx(0.08)
    assert "input_image" not in stub.state.of("submit")[0].json


def test_fill_sends_image_and_mask_at_the_images_size(stub: BFLStub) -> None:
    image = input_image(1024, 768)
    mask = mask_image(1024, 768, (10, 10, 200, 200))
    b = backend("flux-pro-1.0-fill", config("bfl", stub.url, KEY))
    p = b.resolve(params("flux-pro-1.0-fill", width=1024, height=768, images=(image,), mask=mask))
    result = run(generate_once(b, p))
    (out,) = result.images
    assert (out.width, out.height) == (1024, 768)
    assert result.cost_usd == pytest.approx(0.05)
    (submit,) = stub.state.of("submit")
    # BFL's mask is white = repaint, as ours: the bytes go unchanged.
    assert submit.json == {
        "prompt": "a red fox in the snow",
        "seed": 42,
        "output_format": "png",
        "image": base64.b64encode(image.data).decode(),
        "mask": base64.b64encode(mask.data).decode(),
        "steps": 50,
        "guidance": 60.0,
    }


def test_fill_steps_and_guidance_ranges(stub: BFLStub) -> None:
    b = backend("flux-pro-1.0-fill", config("bfl", stub.url, KEY))
    image, mask = input_image(512, 512), mask_image(512, 512, (0, 0, 9, 9))
    with pytest.raises(InvalidParamsError, match=r"steps must be 15\.\.50"):
        b.resolve(params("flux-pro-1.0-fill", images=(image,), mask=mask, steps=10))
    with pytest.raises(InvalidParamsError, match=r"guidance_scale must be 1\.5\.\.100"):
        b.resolve(params("flux-pro-1.0-fill", images=(image,), mask=mask, guidance_scale=120))


def test_unsupported_answers_per_model(stub: BFLStub) -> None:
    cfg = config("bfl", stub.url, KEY)
    image, mask = input_image(1024, 1024), mask_image(1024, 1024, (0, 0, 9, 9))
    kontext = backend("flux-kontext-pro", cfg)
    assert kontext.unsupported(params("flux-kontext-pro", images=(image,) * 4)) is None
    assert kontext.unsupported(params("flux-kontext-pro", images=(image,) * 5)) == (
        "model 'flux-kontext-pro' takes at most 4 input images, got 5"
    )
    reason = kontext.unsupported(params("flux-kontext-pro", images=(image,), mask=mask))
    assert reason is not None and "does not take a mask" in reason
    assert "flux-pro-1.0-fill" in reason
    flux2 = backend("flux-2-pro", cfg)
    assert flux2.unsupported(params("flux-2-pro", images=(image,) * 8)) is None
    fill = backend("flux-pro-1.0-fill", cfg)
    assert fill.unsupported(params("flux-pro-1.0-fill", images=(image,), mask=mask)) is None
    assert "does not take text-to-image" in (fill.unsupported(params("flux-pro-1.0-fill")) or "")
    reason = fill.unsupported(params("flux-pro-1.0-fill", images=(image,)))
    assert reason is not None and "send an image and a mask" in reason
    pro = backend("flux-pro-1.1", cfg)
    reason = pro.unsupported(params("flux-pro-1.1", images=(image,)))
    assert reason is not None and "'flux-pro-1.1'" in reason and "Redux" in reason
    with pytest.raises(InvalidParamsError):
        run(generate_once(pro, params("flux-pro-1.1", images=(image,))))
    assert stub.state.requests == []
