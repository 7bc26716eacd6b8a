"""The router through the whole service, against live provider stubs on loopback: fallback to the
local tiny model, local-only sending nothing out, budgets, circuit breakers, and the cache,
sanitizer and ledger applied to hosted results exactly as to local ones."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server import errors
from server.http.errors import status_of
from server.service import ImageRequest, ImageService
from server.settings import Settings
from tests.stubs.bfl_stub import BFLStub, moderated
from tests.stubs.common import reply, require_specs, specs_missing, variant
from tests.stubs.fixtures import FAST, live
from tests.stubs.imagegen_stub import ImagegenStub
from tests.stubs.midjourney_stub import MidjourneyStub
from tests.stubs.openai_stub import OpenAIStub
from tests.stubs.stability_stub import StabilityStub

# provider id -> (stub factory, key, hosted model, route of the first call)
PROVIDERS: dict[str, tuple[Any, str, str, str]] = {
    "openai": (lambda: OpenAIStub(api_key="k-openai"), "k-openai", "gpt-image-2", "generate"),
    "stability": (
        lambda: StabilityStub(api_key="k-stability"),
        "k-stability",
        "stability-core",
        "generate",
    ),
    "bfl": (lambda: BFLStub(api_key="k-bfl", pending_polls=1), "k-bfl", "flux-pro-1.1", "submit"),
    "midjourney": (lambda: MidjourneyStub(secret="k-mj"), "k-mj", "midjourney", "imagine"),
    "imagegen": (
        lambda: ImagegenStub(api_key="k-ig", models=("sdxl",)),
        "k-ig",
        "remote-imagegen",
        "generate",
    ),
}


# The stubs that check every request against the official specs (../shared/specs): without
# them those stubs are not started and the tests that need them skip, saying why.
NEEDS_SPECS = frozenset({"openai", "bfl"})


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, Any]]:
    started: dict[str, Any] = {}
    contexts = []
    try:
        for name, (factory, *_rest) in PROVIDERS.items():
            if name in NEEDS_SPECS and specs_missing() is not None:
                continue
            ctx = live(factory())
            started[name] = ctx.__enter__()
            contexts.append(ctx)
        yield started
    finally:
        for ctx in reversed(contexts):
            ctx.__exit__(None, None, None)


def need(stubs: dict[str, Any], *providers: str) -> None:
    """Skip unless the stubs of `providers` run (the spec-checked ones need the specs)."""
    if any(p not in stubs for p in providers):
        require_specs()


@pytest.fixture(autouse=True)
def clean(stubs: dict[str, Any]) -> Iterator[None]:
    for stub in stubs.values():
        stub.state.reset()
    yield
    for name, stub in stubs.items():
        assert stub.state.invalid == [], f"a request broke the {name} wire contract"


def provider_settings(stubs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, (_factory, key, _model, _route) in PROVIDERS.items():
        if name in stubs:
            out[name] = {"base_url": stubs[name].url, "api_key": key, **FAST}
    out["midjourney"]["usd_per_image"] = 0.05
    return out


def make_service(data_dir: Path, stubs: dict[str, Any], **overrides: Any) -> ImageService:
    overrides.setdefault("providers", provider_settings(stubs))
    return ImageService(Settings(data_dir=data_dir, **overrides))


def generate(service: ImageService, **fields: Any) -> Any:
    # A size every provider and the tiny fallback accept, small enough for a CPU.
    fields.setdefault("width", 256)
    fields.setdefault("height", 256)
    return asyncio.run(service.generate(ImageRequest(**fields)))


def total_requests(stubs: dict[str, Any]) -> int:
    return sum(len(stub.state.requests) for stub in stubs.values())


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_hosted_success_then_fallback_to_local_on_outage(
    data_dir: Path, stubs: dict[str, Any], provider: str
) -> None:
    need(stubs, provider)
    _factory, _key, model, route = PROVIDERS[provider]
    service = make_service(data_dir, stubs, fallbacks={model: ["tiny-sdxl"]})
    try:
        ok = generate(service, prompt="a red fox", model=model, seed=5)
        assert ok.provider == provider and ok.images and not ok.fallback_from
        stub = stubs[provider]
        # An outage: every try answers 500 (1 + max_retries attempts).
        stub.state.script(route, *[reply(500, {"error": "down"}) for _ in range(3)])
        served = generate(service, prompt="a red fox", model=model, seed=6)
        assert served.provider == "local" and served.model == "tiny-sdxl"
        assert served.fallback_from == (model,)
        assert any(model in notice for notice in served.notices)
        assert len(served.images) == 1
    finally:
        service.close()


@pytest.mark.parametrize(
    ("provider", "script"),
    [
        (
            "openai",
            reply(
                400,
                {
                    "error": {
                        "message": "blocked",
                        "type": "image_generation_user_error",
                        "param": None,
                        "code": "moderation_blocked",
                    }
                },
            ),
        ),
        ("stability", variant("filtered")),
        ("bfl", None),
        ("midjourney", None),
    ],
)
def test_moderation_is_content_filtered_without_fallback_or_cache(
    data_dir: Path, stubs: dict[str, Any], provider: str, script: Any
) -> None:
    need(stubs, provider)
    _factory, _key, model, route = PROVIDERS[provider]
    stub = stubs[provider]
    if provider == "bfl":
        stub.state.script("task", moderated("Request Moderated"))
    elif provider == "midjourney":
        from tests.stubs.midjourney_stub import banned

        stub.state.script("imagine", reply(200, banned("forbidden")))
    else:
        stub.state.script(route, script)
    service = make_service(data_dir, stubs, fallbacks={model: ["tiny-sdxl"]})
    try:
        with pytest.raises(errors.ContentFilteredError):
            generate(service, prompt="a harmless teapot", model=model, seed=9)
        assert service.registry.worker.pipeline_calls == 0  # no fallback ran
        assert service.cache.stats()["entries"] == 0
        assert service.ledger.stats()["requests"] == 0 or provider in ("stability", "bfl")
    finally:
        service.close()


def test_local_only_sends_zero_requests_to_any_stub(data_dir: Path, stubs: dict[str, Any]) -> None:
    service = make_service(
        data_dir, stubs, local_only=True, fallbacks={"tiny-sdxl": ["gpt-image-2", "tiny-flux"]}
    )
    try:
        for _f, _k, model, _r in PROVIDERS.values():
            with pytest.raises(errors.LocalOnlyError, match="local-only"):
                generate(service, prompt="a fox", model=model, seed=1)
        served = generate(service, prompt="a fox", model="auto", seed=1)
        assert served.provider == "local"
    finally:
        service.close()
    per_request = make_service(data_dir, stubs)
    try:
        with pytest.raises(errors.LocalOnlyError):
            asyncio.run(
                per_request.generate(
                    ImageRequest(prompt="a fox", model="flux-pro-1.1", local_only=True)
                )
            )
    finally:
        per_request.close()
    assert total_requests(stubs) == 0


def test_budget_cap_refuses_further_spend(data_dir: Path, stubs: dict[str, Any]) -> None:
    # stability-core costs 3 credits ($0.03): a $0.05 cap allows one image, not two.
    service = make_service(data_dir, stubs, budgets={"stability": 0.05})
    try:
        generate(service, prompt="a fox", model="stability-core", seed=1)
        with pytest.raises(errors.BudgetExhaustedError) as info:
            generate(service, prompt="a fox", model="stability-core", seed=2)
        assert status_of(info.value)[0] == 429 and "resets at" in info.value.message
        assert stubs["stability"].state.count("generate") == 1
        # A repeat of the paid request is a free cache hit, so the cap does not block it.
        assert generate(service, prompt="a fox", model="stability-core", seed=1).cached
    finally:
        service.close()


def test_circuit_opens_and_later_requests_skip_the_failing_provider(
    data_dir: Path, stubs: dict[str, Any]
) -> None:
    need(stubs, "bfl")
    stub = stubs["bfl"]
    stub.state.script("submit", *[reply(503, {"detail": "down"}) for _ in range(9)])
    service = make_service(data_dir, stubs, fallbacks={"flux-pro-1.1": ["tiny-sdxl"]})
    try:
        for seed in (1, 2, 3):
            served = generate(service, prompt="a fox", model="flux-pro-1.1", seed=seed, steps=1)
            assert served.provider == "local"
        calls = stub.state.count("submit")
        assert calls == 9  # three requests, three tries each: the breaker is now open
        served = generate(service, prompt="a fox", model="flux-pro-1.1", seed=4, steps=1)
        assert served.provider == "local"
        assert any("circuit open" in n for n in served.notices)
        assert stub.state.count("submit") == calls  # not called while open
    finally:
        service.close()


@pytest.mark.parametrize("provider", ["stability", "bfl", "imagegen"])
def test_seeded_hosted_repeat_is_a_free_cache_hit(
    data_dir: Path, stubs: dict[str, Any], provider: str
) -> None:
    need(stubs, provider)
    model = PROVIDERS[provider][2]
    service = make_service(data_dir, stubs)
    try:
        first = generate(service, prompt="a lighthouse", model=model, seed=77)
        calls = len(stubs[provider].state.requests)
        again = generate(service, prompt="a lighthouse", model=model, seed=77)
        assert again.cached and again.cost_usd == 0.0
        assert again.saved_usd == pytest.approx(first.cost_usd)
        assert [i.data for i in again.images] == [i.data for i in first.images]
        assert len(stubs[provider].state.requests) == calls
        stats = service.stats()
        assert stats["requests"] == 2 and stats["cached"] == 1
    finally:
        service.close()


def test_sanitizer_blocks_before_any_hosted_request(data_dir: Path, stubs: dict[str, Any]) -> None:
    service = make_service(data_dir, stubs)
    try:
        with pytest.raises(errors.PromptBlockedError):
            generate(service, prompt="a n.u.d.e figure", model="gpt-image-2", seed=1)
    finally:
        service.close()
    assert total_requests(stubs) == 0


def test_openai_drops_seed_and_negative_and_is_never_cached(
    data_dir: Path, stubs: dict[str, Any]
) -> None:
    need(stubs, "openai")
    service = make_service(data_dir, stubs)
    try:
        first = generate(
            service, prompt="a fox", model="gpt-image-2", seed=3, negative_prompt="fog"
        )
        assert {"seed", "negative_prompt"} <= set(first.dropped_params)
        again = generate(
            service, prompt="a fox", model="gpt-image-2", seed=3, negative_prompt="fog"
        )
        assert not again.cached  # OpenAI does not honour seeds: no false hits
        assert first.cost_usd > 0
    finally:
        service.close()


def test_a_retired_model_is_refused_before_anything_is_sent(
    data_dir: Path, stubs: dict[str, Any]
) -> None:
    service = make_service(data_dir, stubs)
    try:
        with pytest.raises(errors.InvalidRequestError, match="map_retired_to_replacement"):
            generate(service, prompt="a fox", model="dall-e-3", seed=1)
    finally:
        service.close()
    assert total_requests(stubs) == 0


def test_a_mapped_retired_model_is_served_by_its_replacement(
    data_dir: Path, stubs: dict[str, Any]
) -> None:
    need(stubs, "openai")
    providers = provider_settings(stubs)
    providers["openai"]["map_retired_to_replacement"] = True
    service = make_service(data_dir, stubs, providers=providers)
    try:
        served = generate(
            service, prompt="a fox", model="dall-e-3", quality="hd", style="vivid", seed=1
        )
    finally:
        service.close()
    assert (served.model, served.provider) == ("gpt-image-2", "openai")
    (request,) = stubs["openai"].state.requests
    assert request.json["model"] == "gpt-image-2" and request.json["quality"] == "high"
    assert "style" in served.dropped_params


def _picture(size: int = 256) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


def test_an_edit_passes_over_a_fallback_that_cannot_take_images(
    data_dir: Path, stubs: dict[str, Any]
) -> None:
    """stability-ultra is down; stability-core takes no image, so it is passed over without a
    request, and the local model serves the edit (never a text-to-image picture)."""
    service = make_service(
        data_dir, stubs, fallbacks={"stability-ultra": ["stability-core", "tiny-sdxl"]}
    )
    try:
        stubs["stability"].state.script(
            "generate", *[reply(500, {"error": "down"}) for _ in range(3)]
        )
        served = generate(
            service, prompt="a red door", model="stability-ultra", images=(_picture(),), seed=2
        )
        assert served.provider == "local" and served.params.task == "img2img"
        assert served.fallback_from == ("stability-ultra", "stability-core")
        assert any("stability-core" in n and "image" in n for n in served.notices), served.notices
        paths = [r.path for r in stubs["stability"].state.requests]
        assert paths and all(path.endswith("/ultra") for path in paths), paths
    finally:
        service.close()


def test_an_edit_asked_of_a_model_without_image_inputs_is_a_400_sending_nothing(
    data_dir: Path, stubs: dict[str, Any]
) -> None:
    service = make_service(data_dir, stubs)
    try:
        with pytest.raises(errors.InvalidRequestError) as caught:
            generate(service, prompt="a red door", model="midjourney", images=(_picture(),))
        assert caught.value.param == "model" and status_of(caught.value)[0] == 400
        assert total_requests(stubs) == 0
    finally:
        service.close()
