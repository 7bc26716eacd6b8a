"""MidjourneyBackend against a live stub of the midjourney-proxy protocol (an unofficial bridge)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from models.base import (
    AuthError,
    ContentFilteredError,
    InvalidParamsError,
    TransientBackendError,
)
from models.hosted.config import ProviderConfig
from models.hosted.midjourney import imagine_prompt, parse_progress
from tests.stubs.common import delay, reply, variant
from tests.stubs.fixtures import (
    RecordingEvents,
    RecordingSleep,
    backend,
    config,
    generate_once,
    input_image,
    live,
    params,
    run,
)
from tests.stubs.midjourney_stub import MidjourneyStub, banned

SECRET = "mj-test-secret"


@pytest.fixture(scope="module")
def stub() -> Iterator[MidjourneyStub]:
    with live(MidjourneyStub(secret=SECRET)) as served:
        yield served


@pytest.fixture(autouse=True)
def clean(stub: MidjourneyStub) -> Iterator[None]:
    stub.state.reset()
    yield
    assert stub.state.invalid == [], "a request broke the midjourney-proxy protocol"


def cfg(stub: MidjourneyStub, secret: str | None = SECRET, **overrides: Any) -> ProviderConfig:
    return config("midjourney", stub.url, secret, usd_per_image=0.05, **overrides)


def test_imagine_poll_download(stub: MidjourneyStub) -> None:
    events = RecordingEvents()
    b = backend("midjourney", cfg(stub))
    p = params("midjourney", width=1344, height=768, negative_prompt="text, watermark")
    result = run(generate_once(b, p, events=events))

    (image,) = result.images
    assert image.seed == 42 and image.format == "png"
    assert image.width / image.height == pytest.approx(7 / 4, rel=0.01)  # one 2x2 grid at 7:4
    assert result.cost_usd == pytest.approx(0.05)
    assert result.deterministic is False
    assert any("2x2 grid" in n for n in result.notices)
    (submit,) = stub.state.of("imagine")
    assert submit.headers["mj-api-secret"] == SECRET
    assert submit.json == {
        "prompt": "a red fox in the snow --ar 7:4 --seed 42 --no text, watermark",
        "base64Array": [],
        "notifyHook": "",
        "state": "",
    }
    assert events.seen[0] == ("started", ())
    assert (37, 100) in events.steps and (81, 100) in events.steps
    assert events.steps[-1] == (100, 100)


def test_prompt_parameters() -> None:
    p = params(
        "midjourney", prompt="a  cat\n", negative_prompt="dogs --v 5", width=1024, height=1024
    )
    assert imagine_prompt(p, 9) == "a cat --ar 1:1 --seed 9 --no dogs v 5"
    assert (
        parse_progress("37%") == 37 and parse_progress("") is None and parse_progress(None) is None
    )


def test_n_tasks_with_consecutive_seeds(stub: MidjourneyStub) -> None:
    result = run(generate_once(backend("midjourney", cfg(stub)), params("midjourney", n=2, seed=5)))
    assert sorted(i.seed for i in result.images) == [5, 6]
    assert result.cost_usd == pytest.approx(0.10)
    prompts = sorted(r.json["prompt"] for r in stub.state.of("imagine"))
    assert prompts == [
        "a red fox in the snow --ar 1:1 --seed 5",
        "a red fox in the snow --ar 1:1 --seed 6",
    ]


def test_without_a_configured_price_no_cost_is_booked(stub: MidjourneyStub) -> None:
    b = backend("midjourney", config("midjourney", stub.url, SECRET))
    result = run(generate_once(b, params("midjourney")))
    assert result.cost_usd is None
    assert any("usd_per_image" in n for n in result.notices)
    assert b.estimate_cost_usd(params("midjourney")) is None


def test_submit_429_waits_for_retry_after(stub: MidjourneyStub) -> None:
    stub.state.script("imagine", reply(429, {"code": 429, "description": "busy"}, retry_after="1"))
    sleep = RecordingSleep()
    result = run(generate_once(backend("midjourney", cfg(stub), sleep), params("midjourney")))
    assert len(result.images) == 1
    assert sleep.waits[0] == 1.0
    assert stub.state.count("imagine") == 2


def test_fetch_500_then_success(stub: MidjourneyStub) -> None:
    stub.state.script("fetch", reply(500, {"code": 500, "description": "oops"}))
    result = run(generate_once(backend("midjourney", cfg(stub)), params("midjourney")))
    assert len(result.images) == 1
    assert stub.state.count("imagine") == 1


def test_timeout_is_transient(stub: MidjourneyStub) -> None:
    stub.state.script("imagine", delay(1.0), delay(1.0))
    b = backend("midjourney", cfg(stub, timeout_s=0.25, max_retries=1))
    with pytest.raises(TransientBackendError, match="no answer within"):
        run(generate_once(b, params("midjourney")))
    assert stub.state.count("imagine") == 2


def test_banned_word_is_content_filtered(stub: MidjourneyStub) -> None:
    stub.state.script("imagine", reply(200, banned("forbidden")))
    with pytest.raises(ContentFilteredError, match="banned word 'forbidden'"):
        run(generate_once(backend("midjourney", cfg(stub)), params("midjourney")))
    assert stub.state.count("imagine") == 1
    assert stub.state.count("fetch") == 0


def test_failure_for_a_banned_prompt_is_content_filtered(stub: MidjourneyStub) -> None:
    stub.state.script("task", variant("FAILURE"))
    with pytest.raises(ContentFilteredError, match="Banned prompt"):
        run(generate_once(backend("midjourney", cfg(stub)), params("midjourney")))
    assert stub.state.count("imagine") == 1


def test_other_codes(stub: MidjourneyStub) -> None:
    stub.state.script("imagine", reply(200, {"code": 23, "description": "queue full"}))
    with pytest.raises(TransientBackendError, match="code 23"):
        run(generate_once(backend("midjourney", cfg(stub)), params("midjourney")))
    stub.state.script("imagine", reply(200, {"code": 9, "description": "failure"}))
    with pytest.raises(Exception, match="code 9"):
        run(generate_once(backend("midjourney", cfg(stub)), params("midjourney")))


def test_bad_secret_is_an_auth_error(stub: MidjourneyStub) -> None:
    bad = "mj-wrong-secret-42"
    with pytest.raises(AuthError) as caught:
        run(generate_once(backend("midjourney", cfg(stub, secret=bad)), params("midjourney")))
    assert "midjourney: the API key was rejected (401)" in str(caught.value)
    assert "providers.midjourney.api_key" in str(caught.value) and bad not in str(caught.value)


def test_seed_range(stub: MidjourneyStub) -> None:
    with pytest.raises(InvalidParamsError) as caught:
        backend("midjourney", cfg(stub)).resolve(params("midjourney", seed=2**32))
    assert caught.value.param == "seed"


def test_an_edit_is_refused_naming_what_the_proxy_lacks(stub: MidjourneyStub) -> None:
    from models.base import LoraRef

    b = backend("midjourney", cfg(stub))
    image = input_image(1024, 1024)
    reason = b.unsupported(params("midjourney", images=(image,)))
    assert reason is not None and "'midjourney'" in reason and "base64Array" in reason
    assert b.unsupported(params("midjourney")) is None
    lora = params("midjourney", loras=(LoraRef("style", 1.0, "0" * 64),))
    assert "takes no LoRA adapters" in (b.unsupported(lora) or "")
    with pytest.raises(InvalidParamsError):
        run(generate_once(b, params("midjourney", images=(image,))))
    assert stub.state.requests == []
