"""What all hosted backends share: provider config, retry timing, the price table, the catalogue."""

from __future__ import annotations

import asyncio
import datetime as dt
import tomllib
from email.utils import formatdate
from importlib import resources
from typing import Any

import httpx
import pytest

from models.base import (
    AuthError,
    ContentFilteredError,
    GeneratedImage,
    InvalidParamsError,
    TransientBackendError,
)
from models.catalogue import Catalogue
from models.hosted import HOSTED_KINDS, make_hosted_backend
from models.hosted.client import HostedHTTP, same_site
from models.hosted.config import ProviderConfig, ProviderConfigError
from models.hosted.results import Piece, Report, fan_out
from models.hosted.retry import RetryPolicy, parse_retry_after
from models.prices import PriceError, PriceTable
from tests.stubs.fixtures import RecordingEvents, RecordingSleep, generate_once, params

SECRET = "sk-very-secret-value-123"

# ------------------------------------------------------------------ config


def test_config_from_settings_section() -> None:
    cfg = ProviderConfig.from_mapping(
        "stability", {"api_key": SECRET, "timeout_s": "12.5", "max_retries": 1}
    )
    assert cfg.base_url == "https://api.stability.ai"
    assert cfg.timeout_s == 12.5 and cfg.max_retries == 1 and cfg.retry_cap_s == 30.0
    assert cfg.api_key_value() == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    assert cfg.key_setting == (
        "providers.stability.api_key / IMAGEGEN_PROVIDERS__STABILITY__API_KEY"
    )


@pytest.mark.parametrize(
    ("provider", "raw", "fragment"),
    [
        (
            "openai",
            {"timeout_s": "soon"},
            "providers.openai.timeout_s: Input should be a valid number",
        ),
        ("openai", {"timeout_s": 0}, "providers.openai.timeout_s: Input should be greater than 0"),
        ("openai", {"timeout_s": "inf"}, "providers.openai.timeout_s: Input should be a finite"),
        ("bfl", {"max_retries": 1.5}, "providers.bfl.max_retries: Input should be a valid integer"),
        ("bfl", {"retry_cap": 3}, "providers.bfl.retry_cap is not a setting; known settings are"),
        ("midjourney", {}, "providers.midjourney.base_url: is required for 'midjourney'"),
        (
            "openai",
            {"base_url": "api.openai.com"},
            "providers.openai.base_url: must be an http(s) URL",
        ),
        (
            "openai",
            {"map_retired_to_replacement": "maybe"},
            "providers.openai.map_retired_to_replacement: Input should be a valid boolean",
        ),
        (
            "midjourney",
            {"base_url": "http://x", "usd_per_image": -1},
            "providers.midjourney.usd_per_image: Input should be greater than or equal to 0",
        ),
        ("openai", {"provider": "bfl"}, "providers.openai.provider is not a setting"),
    ],
)
def test_config_errors_name_the_field(provider: str, raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ProviderConfigError) as caught:
        ProviderConfig.from_mapping(provider, raw)
    assert fragment in str(caught.value)


def test_config_error_never_echoes_a_key() -> None:
    with pytest.raises(ProviderConfigError) as caught:
        ProviderConfig.from_mapping("openai", {"api_key": 12345678901234})
    assert "12345678901234" not in str(caught.value)
    assert "providers.openai.api_key: must be a string" in str(caught.value)
    with pytest.raises(ProviderConfigError) as caught:
        ProviderConfig.from_mapping("openai", {"timeout_s": "sk-pasted-here"})
    assert "sk-pasted-here" not in str(caught.value)


def test_config_from_the_settings_object() -> None:
    from server.settings import Settings

    settings = Settings(providers={"bfl": {"api_key": SECRET, "poll_interval_s": 2}})
    cfg = settings.providers["bfl"]
    assert cfg == ProviderConfig.from_mapping("bfl", {"api_key": SECRET, "poll_interval_s": 2})
    assert cfg.poll_interval_s == 2.0 and cfg.api_key_value() == SECRET


# ------------------------------------------------------------------ retry timing


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after({"Retry-After": formatdate(now + 30, usegmt=True)}, now=now) == 30.0
    assert parse_retry_after({"Retry-After": formatdate(now - 30, usegmt=True)}, now=now) == 0.0


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(max_retries=5, backoff_base_s=0.5, retry_cap_s=3.0)
    assert [policy.backoff(i) for i in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_connection_errors_are_retried_then_transient() -> None:
    calls = 0

    def refuse(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=request)

    cfg = ProviderConfig.from_mapping(
        "stability", {"api_key": SECRET, "max_retries": 2, "backoff_base_s": 0.1}
    )
    sleep = RecordingSleep()
    http = HostedHTTP(cfg, transport=httpx.MockTransport(refuse), sleep=sleep)

    async def go() -> None:
        try:
            await http.send("GET", "https://api.stability.ai/x", what="probe")
        finally:
            await http.aclose()

    with pytest.raises(TransientBackendError, match=r"after 3 attempt\(s\): connection failed"):
        asyncio.run(go())
    assert calls == 3 and sleep.waits == [0.1, 0.2]


def test_403_is_an_auth_error_and_the_key_is_scrubbed_everywhere() -> None:
    def deny(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"detail": f"key {SECRET} is not allowed"})

    cfg = ProviderConfig.from_mapping("bfl", {"api_key": SECRET})
    http = HostedHTTP(cfg, transport=httpx.MockTransport(deny), sleep=RecordingSleep())

    async def go() -> None:
        try:
            await http.send("GET", "https://api.bfl.ai/v1/x", what="probe")
        finally:
            await http.aclose()

    with pytest.raises(AuthError) as caught:
        asyncio.run(go())
    assert SECRET not in str(caught.value)
    assert "providers.bfl.api_key" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "base", "same"),
    [
        ("https://api.eu.bfl.ai/v1/get_result?id=1", "https://api.bfl.ai", True),
        ("https://api.bfl.ai/v1/get_result", "https://api.bfl.ai", True),
        ("https://delivery.example.com/x.png", "https://api.bfl.ai", False),
        ("https://evilbfl.ai/x", "https://api.bfl.ai", False),
        ("http://127.0.0.1:9/x", "http://127.0.0.1:9", True),
        ("http://127.0.0.2:9/x", "http://127.0.0.1:9", False),
    ],
)
def test_credentials_only_go_to_the_providers_own_hosts(url: str, base: str, same: bool) -> None:
    assert same_site(url, base) is same


# ------------------------------------------------------------------ prices


def test_every_price_has_a_source_and_a_date() -> None:
    raw = tomllib.loads((resources.files("models") / "data" / "prices.toml").read_text("utf-8"))
    assert raw["price"]
    for row in raw["price"]:
        # PROVIDERS.md, or (edit services it does not list) the page or derivation it came from.
        assert "PROVIDERS.md" in row["source"] or "." in row["source"], row
        assert isinstance(row["as_of"], dt.date) and row["as_of"] >= dt.date(2026, 11, 28), row


def test_price_lookups() -> None:
    table = PriceTable.load()
    assert table.price_per_image("stability-ultra") == pytest.approx(0.08)
    assert table.price_per_image("stability-sd3.5-flash") == pytest.approx(0.025)
    assert table.price_per_image("dall-e-3") == pytest.approx(0.04)
    assert table.price_per_image("dall-e-3", "hd") == pytest.approx(0.08)
    assert table.price_per_image("dall-e-3", "hd", "1792x1024") == pytest.approx(0.12)
    assert table.price_per_image("dall-e-3", "standard", "1024x1792") == pytest.approx(0.08)
    assert table.price_per_image("gpt-image-1", "high") == pytest.approx(0.167)
    assert table.price_per_image("gpt-image-1", "low", "1536x1024") is None  # not listed
    assert table.price_per_image("flux-pro-1.1") == pytest.approx(0.04)
    assert table.price_per_image("bfl-flux-dev") == pytest.approx(0.025)
    assert table.price_per_image("flux-2-pro", size="1000x1000") == pytest.approx(0.03)
    assert table.price_per_image("gpt-image-2") is None  # token-billed
    assert table.price_per_image("midjourney") is None  # configured
    assert table.price_per_image("flux-dev") is None  # the LOCAL model has no price row
    assert table.price_per_image("no-such-model") is None


def test_token_cost() -> None:
    table = PriceTable.load()
    usage = {
        "input_tokens": 1_000_000,
        "output_tokens": 1_000_000,
        "input_tokens_details": {"text_tokens": 400_000, "image_tokens": 600_000},
    }
    assert table.token_cost("gpt-image-2", usage) == pytest.approx(2.0 + 4.8 + 30.0)
    assert table.token_cost("gpt-image-2-2026-04-21", {"input_tokens": 100}) == pytest.approx(
        0.0005
    )
    with pytest.raises(PriceError):
        table.token_cost("dall-e-3", usage)


def test_price_rows_must_be_sourced_and_dated() -> None:
    with pytest.raises(PriceError, match="'source' is required"):
        PriceTable.from_toml(
            '[[price]]\nmodel="x"\nprovider="p"\nusd_per_image=1\nas_of=2026-01-01'
        )
    with pytest.raises(PriceError, match="'as_of' must be a TOML date"):
        PriceTable.from_toml(
            '[[price]]\nmodel="x"\nprovider="p"\nsource="s"\nusd_per_image=1\nas_of="x"'
        )


# ------------------------------------------------------------------ catalogue and dispatch


def test_hosted_catalogue_entries() -> None:
    catalogue = Catalogue.load()
    hosted = {n: s for n, s in catalogue.specs.items() if s.kind in HOSTED_KINDS}
    for name in (
        "gpt-image-2",
        "dall-e-3",
        "stability-ultra",
        "stability-core",
        "stability-sd3.5-large",
        "stability-sd3.5-large-turbo",
        "stability-sd3.5-medium",
        "stability-sd3.5-flash",
        "flux-pro-1.1",
        "flux-pro-1.1-ultra",
        "bfl-flux-dev",
        "flux-2-pro",
        "midjourney",
        "remote-imagegen",
    ):
        assert name in hosted, name
        assert hosted[name].source, name
        assert hosted[name].provider_model, name
    assert catalogue.get("dall-e-3").replacement == "gpt-image-2"  # type: ignore[union-attr]
    # The local names still mean the local models.
    for local in ("flux-dev", "flux-schnell", "sdxl", "sdxl-turbo", "tiny-sdxl", "tiny-flux"):
        assert catalogue.get(local).is_local, local  # type: ignore[union-attr]
    # Every priced hosted model exists in the price table under its catalogue name.
    table = PriceTable.load()
    for name, spec in hosted.items():
        if spec.kind in ("openai", "stability", "bfl", "midjourney"):
            assert table.rows_for(name), name


def test_make_hosted_backend_dispatches_on_kind() -> None:
    catalogue = Catalogue.load()
    expected = {
        "gpt-image-2": "OpenAIImagesBackend",
        "stability-core": "StabilityBackend",
        "flux-pro-1.1": "BFLBackend",
        "midjourney": "MidjourneyBackend",
        "remote-imagegen": "RemoteImagegenBackend",
    }
    for name, cls in expected.items():
        spec = catalogue.get(name)
        assert spec is not None
        cfg = ProviderConfig.from_mapping(
            spec.source, {"api_key": SECRET, "base_url": "http://h:1"}
        )
        b = make_hosted_backend(spec, cfg)
        assert type(b).__name__ == cls
        assert b.provider == spec.source and not b.is_local
        identity = b.identity(params(name)).as_dict()
        assert identity["extra"]["host"] == "h:1"
        assert SECRET not in repr(identity)
    with pytest.raises(ValueError, match="not hosted"):
        make_hosted_backend(catalogue.get("sdxl"), ProviderConfig.from_mapping("openai", {}))  # type: ignore[arg-type]


def test_importing_the_package_does_not_import_the_sdk_or_torch() -> None:
    import subprocess
    import sys

    # The settings import models.hosted (provider ids, ProviderConfig) on every CLI command:
    # neither may pull in the SDK, torch or httpx.
    code = (
        "import sys, models.hosted, server.settings; "
        "print(*(name in sys.modules for name in ('openai', 'torch', 'httpx')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("stability-core", {"n": 2}, 0.06),
        ("stability-sd3.5-large-turbo", {}, 0.04),
        ("dall-e-3", {"quality": "hd", "width": 1792, "height": 1024}, 0.12),
        ("flux-pro-1.1", {"n": 3}, 0.12),
        ("flux-2-pro", {"width": 1000, "height": 1000}, 0.03),
        ("gpt-image-2", {}, None),  # token-billed: the service falls back to past usage
        ("remote-imagegen", {}, None),  # the remote server reports its own cost
    ],
)
def test_estimates_come_from_the_price_table(
    name: str, overrides: dict[str, Any], expected: float | None
) -> None:
    spec = Catalogue.load().get(name)
    assert spec is not None
    cfg = ProviderConfig.from_mapping(spec.source, {"base_url": "http://h:1"})
    estimate = make_hosted_backend(spec, cfg).estimate_cost_usd(params(name, **overrides))
    assert estimate == (None if expected is None else pytest.approx(expected))


def test_midjourney_estimate_is_the_configured_price() -> None:
    spec = Catalogue.load().get("midjourney")
    assert spec is not None
    cfg = ProviderConfig.from_mapping(
        "midjourney", {"base_url": "http://h:1", "usd_per_image": 0.1}
    )
    b = make_hosted_backend(spec, cfg)
    assert b.estimate_cost_usd(params("midjourney", n=3)) == pytest.approx(0.3)


# ------------------------------------------------------------------ the generate template


def _stub_answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503, json={"error": {"message": "down", "code": None}})


@pytest.mark.parametrize("name", ["gpt-image-2", "stability-core", "flux-pro-1.1"])
def test_a_provider_that_needs_a_key_fails_before_anything_is_sent(name: str) -> None:
    sent: list[httpx.Request] = []
    spec = Catalogue.load().get(name)
    assert spec is not None
    cfg = ProviderConfig.from_mapping(spec.source, {})
    transport = httpx.MockTransport(lambda r: sent.append(r) or _stub_answer(r))
    b = make_hosted_backend(spec, cfg, transport=transport, sleep=RecordingSleep())
    events = RecordingEvents()
    with pytest.raises(AuthError, match="no API key is configured"):
        asyncio.run(generate_once(b, params(name, width=1024, height=1024), events=events))
    assert sent == [] and events.seen == []


@pytest.mark.parametrize(
    "name", ["gpt-image-2", "stability-core", "flux-pro-1.1", "midjourney", "remote-imagegen"]
)
def test_started_is_reported_when_the_request_is_submitted(name: str) -> None:
    events = RecordingEvents()
    seen_at_first_request: list[list[Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen_at_first_request.append(list(events.seen))
        return _stub_answer(request)

    spec = Catalogue.load().get(name)
    assert spec is not None
    cfg = ProviderConfig.from_mapping(
        spec.source, {"api_key": SECRET, "base_url": "http://h:1", "max_retries": 0}
    )
    b = make_hosted_backend(
        spec, cfg, transport=httpx.MockTransport(answer), sleep=RecordingSleep()
    )
    with pytest.raises(TransientBackendError):
        asyncio.run(generate_once(b, params(name), events=events))
    assert seen_at_first_request[0] == [("started", ())]
    assert events.seen == [("started", ())]  # nothing came back, so no progress


def _image() -> GeneratedImage:
    return GeneratedImage(data=b"x", seed=None, width=1, height=1)


def test_fan_out_reports_each_image_and_keeps_order() -> None:
    events = RecordingEvents()

    async def one(index: int, report: Report) -> Piece:
        report(0.5)
        await asyncio.sleep(0.01 * (3 - index))  # finish in reverse order
        return Piece(GeneratedImage(data=bytes([index]), seed=index, width=1, height=1), 0.01)

    pieces = asyncio.run(fan_out(3, one, events))
    assert [p.image.seed for p in pieces] == [0, 1, 2]
    assert events.steps == [(16, 100), (33, 100), (50, 100), (66, 100), (83, 100), (100, 100)]


def test_fan_out_failure_carries_everything_billed_and_a_filter_wins() -> None:
    async def one(index: int, report: Report) -> Piece:
        if index == 1:
            raise TransientBackendError("p: down", provider="p")
        if index == 2:
            raise ContentFilteredError("p: refused", provider="p", charged_usd=0.02)
        return Piece(_image(), 0.03)

    with pytest.raises(ContentFilteredError) as caught:
        asyncio.run(fan_out(4, one, RecordingEvents()))
    # Images 0 and 3 were made (2 x 0.03) and the filtered call was charged 0.02.
    assert caught.value.charged_usd == pytest.approx(0.08)


def test_fan_out_of_one_failure_keeps_its_type_and_message() -> None:
    async def one(index: int, report: Report) -> Piece:
        if index == 1:
            raise InvalidParamsError("p: bad seed", provider="p", param="seed")
        return Piece(_image(), None)  # cost unknown: nothing to add

    with pytest.raises(InvalidParamsError) as caught:
        asyncio.run(fan_out(3, one, RecordingEvents()))
    assert (caught.value.param, caught.value.charged_usd) == ("seed", 0.0)


# ------------------------------------------------------------------ token-billed upper bound


def _openai(**config: Any) -> Any:
    spec = Catalogue.load().get("gpt-image-2")
    assert spec is not None
    return make_hosted_backend(spec, ProviderConfig.from_mapping("openai", config))


def calculator_tokens(quality: str, width: int, height: int) -> int:
    """gpt-image-2 output tokens as OpenAI's cost calculator gives them (the formula quoted in
    models/data/prices.toml): the oracle the table's bound must never fall below."""
    factor = {"low": 16, "medium": 48, "high": 96}[quality]
    long_side, short_side = max(width, height), min(width, height)
    short_factor = (2 * factor * short_side + long_side) // (2 * long_side)
    area = (2_000_000 + width * height) * factor * short_factor
    return (area + 4_000_000 - 1) // 4_000_000


@pytest.mark.parametrize(
    ("quality", "size"),
    [("low", (1024, 1024)), ("low", (256, 256)), ("low", (1536, 1024)), (None, (1024, 1024))],
)
def test_a_tenth_of_a_cent_cap_is_passed_by_the_bound(
    quality: str | None, size: tuple[int, int]
) -> None:
    # The budget defect: an empty ledger and no per-image price reserved 0, so a $0.001 daily
    # cap let the first gpt-image-2 request through. The bound is what the budget reserves.
    p = params("gpt-image-2", quality=quality, width=size[0], height=size[1])
    bound = _openai().max_cost_usd(p)
    assert _openai().estimate_cost_usd(p) is None  # still no expected figure
    assert bound is not None and bound > 0.001


def test_the_bound_covers_what_the_calculator_bills_at_every_size() -> None:
    table = PriceTable.load()
    b = _openai()
    for quality in ("low", "medium", "high"):
        for width in range(256, 3841, 112):
            for height in range(256, 3841, 112):
                if max(width, height) > 3 * min(width, height) or min(width, height) > 2160:
                    continue
                p = params("gpt-image-2", quality=quality, width=width, height=height, prompt="")
                billed = table.token_cost(
                    "gpt-image-2", {"output_tokens": calculator_tokens(quality, width, height)}
                )
                assert b.max_cost_usd(p) >= billed, (quality, width, height)


def test_the_bound_at_the_listed_sizes_and_its_inputs() -> None:
    b = _openai()
    prompt = "ü" * 10  # 20 UTF-8 bytes: at most 20 text tokens
    high = b.max_cost_usd(params("gpt-image-2", quality="high", prompt=prompt))
    assert high == pytest.approx((7024 * 30 + 20 * 5) / 1e6)
    # auto and no quality count as high; DALL-E's "hd" is sent as high.
    for quality in (None, "auto", "hd"):
        assert b.max_cost_usd(params("gpt-image-2", quality=quality, prompt=prompt)) == high
    wide = b.max_cost_usd(params("gpt-image-2", quality="low", width=1536, height=1024, n=3))
    assert wide == pytest.approx(3 * (158 * 30 + 21 * 5) / 1e6)  # the default prompt: 21 bytes
    # Past 1024x1024 the largest figure scales with the area.
    big = b.max_cost_usd(params("gpt-image-2", quality="medium", width=2048, height=2048))
    assert big == pytest.approx((1756 * 4 * 30 + 21 * 5) / 1e6)
    # More than the stub's usage for the same request (4160 output tokens at high).
    usage = {"output_tokens": 4160, "input_tokens_details": {"text_tokens": 20}}
    assert high >= PriceTable.load().token_cost("gpt-image-2", usage)


def test_only_token_billed_models_have_a_bound() -> None:
    for name in ("dall-e-3", "stability-core", "flux-pro-1.1", "remote-imagegen"):
        spec = Catalogue.load().get(name)
        assert spec is not None
        cfg = ProviderConfig.from_mapping(spec.source, {"base_url": "http://h:1"})
        assert make_hosted_backend(spec, cfg).max_cost_usd(params(name)) is None, name


def test_output_token_rows_are_sourced_and_dated() -> None:
    raw = tomllib.loads((resources.files("models") / "data" / "prices.toml").read_text("utf-8"))
    rows = raw["image_output_tokens"]
    assert {row["quality"] for row in rows} == {"low", "medium", "high"}
    for row in rows:
        assert row["source"] and isinstance(row["as_of"], dt.date), row
        assert set(row["tokens"]) == {"1024x1024", "1024x1536", "1536x1024"}, row
    with pytest.raises(PriceError, match="tokens for 1024x1024 must be a whole number"):
        PriceTable.from_toml(
            '[[image_output_tokens]]\nmodel="m"\nquality="low"\nsource="s"\n'
            'as_of=2026-01-01\ntokens={ "1024x1024" = 0 }'
        )
