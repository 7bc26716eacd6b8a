"""A1111's attention syntax on hosted models, against the real stubs on loopback: a provider
that cannot weight gets the prompt without the syntax (the text a local Flux model gets) and
the weighting is reported dropped; `(word:1.0)` is plainly `word`; another imagegen server
gets the syntax as written, since it parses and weights the prompt itself."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import pytest

from models.base import GenerationParams, PromptTooLongError
from tests.stubs.bfl_stub import BFLStub
from tests.stubs.common import require_specs
from tests.stubs.fixtures import Stub, backend, config, generate_once, live, params, run
from tests.stubs.imagegen_stub import ImagegenStub
from tests.stubs.midjourney_stub import MidjourneyStub
from tests.stubs.openai_stub import OpenAIStub
from tests.stubs.stability_stub import StabilityStub

WEIGHTED = r"a (red:1.3) fox in the [snow] BREAK \(1990\)"
PLAIN = "a red fox in the snow (1990)"
NEGATIVE = "(blurry:1.2), text"
KEY = "k-test-prompt-weights"


S = TypeVar("S", bound=Stub)


def _serve(stub: S, *, specs: bool = False) -> Iterator[S]:
    if specs:
        require_specs()  # the stub checks requests against the provider's published schema
    with live(stub) as served:
        yield served


@pytest.fixture(scope="module")
def openai() -> Iterator[OpenAIStub]:
    yield from _serve(OpenAIStub(api_key=KEY), specs=True)


@pytest.fixture(scope="module")
def stability() -> Iterator[StabilityStub]:
    yield from _serve(StabilityStub(api_key=KEY))


@pytest.fixture(scope="module")
def bfl() -> Iterator[BFLStub]:
    yield from _serve(BFLStub(api_key=KEY, pending_polls=0), specs=True)


@pytest.fixture(scope="module")
def midjourney() -> Iterator[MidjourneyStub]:
    yield from _serve(MidjourneyStub(secret=KEY))


@pytest.fixture(scope="module")
def imagegen() -> Iterator[ImagegenStub]:
    yield from _serve(ImagegenStub(api_key=KEY))


def _generate(stub: Stub, provider: str, model: str, **overrides: Any) -> Any:
    stub.state.reset()
    b = backend(model, config(provider, stub.url, KEY))
    p: GenerationParams = params(model, **overrides)
    result = run(generate_once(b, p))
    assert stub.state.invalid == [], f"a request broke the {provider} wire contract"
    return result


def _sent(stub: Stub, route: str) -> dict[str, Any]:
    (request,) = stub.state.of(route)
    sent = request.json if request.json is not None else request.form
    assert isinstance(sent, dict)
    return sent


def test_openai_gets_the_text_without_the_syntax(openai: OpenAIStub) -> None:
    result = _generate(openai, "openai", "gpt-image-2", prompt=WEIGHTED)
    assert _sent(openai, "generate")["prompt"] == PLAIN
    assert "prompt weighting" in result.dropped_params


def test_stability_gets_both_prompts_without_the_syntax(stability: StabilityStub) -> None:
    result = _generate(
        stability, "stability", "stability-core", prompt=WEIGHTED, negative_prompt=NEGATIVE
    )
    sent = _sent(stability, "generate")
    assert (sent["prompt"], sent["negative_prompt"]) == (PLAIN, "blurry, text")
    assert result.dropped_params == ("prompt weighting",)


def test_a_weighted_negative_alone_is_reported(stability: StabilityStub) -> None:
    result = _generate(
        stability, "stability", "stability-core", prompt="a fox", negative_prompt=NEGATIVE
    )
    assert _sent(stability, "generate")["negative_prompt"] == "blurry, text"
    assert result.dropped_params == ("prompt weighting",)


def test_weight_one_is_the_plain_word_and_nothing_is_dropped(stability: StabilityStub) -> None:
    result = _generate(stability, "stability", "stability-core", prompt="a (red:1.0) fox")
    assert _sent(stability, "generate")["prompt"] == "a red fox"
    assert result.dropped_params == ()


def test_bfl_gets_the_text_without_the_syntax(bfl: BFLStub) -> None:
    result = _generate(bfl, "bfl", "flux-pro-1.1", prompt=WEIGHTED)
    assert _sent(bfl, "submit")["prompt"] == PLAIN
    assert result.dropped_params == ("prompt weighting",)


def test_midjourney_gets_the_text_without_the_syntax(midjourney: MidjourneyStub) -> None:
    result = _generate(
        midjourney,
        "midjourney",
        "midjourney",
        prompt=WEIGHTED,
        negative_prompt=NEGATIVE,
        width=1024,
        height=1024,
    )
    sent = _sent(midjourney, "imagine")["prompt"]
    assert sent == f"{PLAIN} --ar 1:1 --seed 42 --no blurry, text"
    assert "prompt weighting" in result.dropped_params


def test_the_prompt_limit_counts_what_is_sent(openai: OpenAIStub) -> None:
    """The catalogue's max_prompt_chars is the provider's limit: on the text it is sent."""
    b = backend("dall-e-3", config("openai", openai.url, KEY))
    limit = b.spec.extra.get("max_prompt_chars")
    assert isinstance(limit, int)
    b.check_prompt("(" + "a" * limit + ":1.2)")  # `limit` characters once sent
    with pytest.raises(PromptTooLongError, match=f"prompt is {limit + 1} characters"):
        b.check_prompt("(" + "a" * (limit + 1) + ":1.2)")
    run(b.close())


def test_another_imagegen_server_gets_the_syntax_as_written(imagegen: ImagegenStub) -> None:
    result = _generate(
        imagegen, "imagegen", "remote-imagegen", prompt=WEIGHTED, negative_prompt=NEGATIVE
    )
    sent = _sent(imagegen, "generate")
    assert (sent["prompt"], sent["negative_prompt"]) == (WEIGHTED, NEGATIVE)
    assert "prompt weighting" not in result.dropped_params
