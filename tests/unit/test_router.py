"""Router policies, fallback chains, circuit breakers and budgets (no backends needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.catalogue import Catalogue
from server import errors
from server.http.errors import status_of
from server.ledger import Ledger, LedgerRow
from server.router import CircuitBreaker, Router
from server.settings import Settings
from server.store.sql import open_database

HOSTED = [
    {"name": "h-openai", "kind": "openai", "source": "openai", "provider_model": "gpt-image-2"},
    {"name": "h-bfl", "kind": "bfl", "source": "bfl", "provider_model": "flux-pro-1.1"},
]


def make_router(tmp_path: Path, **overrides: Any) -> Router:
    overrides["models"] = [*HOSTED, *overrides.get("models", [])]
    settings = Settings(data_dir=tmp_path, **overrides)
    ledger = Ledger(open_database(None, path=tmp_path / "db.sqlite3"))
    return Router(settings, Catalogue.load(settings.models), ledger)


def names(chain: list[Any]) -> list[str]:
    return [c.spec.name for c in chain]


def test_fallback_chain_from_config(tmp_path: Path) -> None:
    router = make_router(tmp_path, fallbacks={"h-bfl": ["h-openai", "tiny-sdxl", "nope"]})
    assert names(router.plan("h-bfl", local_only=False)) == ["h-bfl", "h-openai", "tiny-sdxl"]


def test_local_only_refuses_hosted_and_drops_hosted_fallbacks(tmp_path: Path) -> None:
    router = make_router(tmp_path, fallbacks={"tiny-flux": ["h-openai", "tiny-sdxl"]})
    with pytest.raises(errors.LocalOnlyError, match="local-only"):
        router.plan("h-openai", local_only=True)
    assert names(router.plan("tiny-flux", local_only=True)) == ["tiny-flux", "tiny-sdxl"]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("local-first", ["tiny-sdxl", "h-bfl", "h-openai"]),
        ("hosted-first", ["h-bfl", "h-openai", "tiny-sdxl"]),
        ("cheapest", ["h-openai", "tiny-sdxl", "h-bfl"]),
        ("local-only", ["tiny-sdxl"]),
    ],
)
def test_auto_policies(tmp_path: Path, policy: str, expected: list[str]) -> None:
    router = make_router(
        tmp_path,
        routing_policy=policy,
        providers={"openai": {"api_key": "k"}, "bfl": {"api_key": "k"}},
    )
    prices = {"h-openai": 0.01, "tiny-sdxl": 0.02, "h-bfl": 0.04}
    chain = router.plan(
        "auto",
        local_only=router.local_only(False),
        estimate=lambda spec: prices.get(spec.name),
    )
    # The built-in hosted catalogue adds more models of the same providers; order among ours:
    assert [n for n in names(chain) if n in prices] == expected


def test_auto_leaves_out_unconfigured_providers(tmp_path: Path) -> None:
    router = make_router(tmp_path, routing_policy="hosted-first", providers={"bfl": {}})
    chain = router.plan("auto", local_only=False)
    assert "h-bfl" in names(chain) and names(chain)[-1] == "tiny-sdxl"
    assert all(c.spec.kind in ("bfl", "sdxl") for c in chain)


def test_circuit_breaker_opens_then_probes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cooldown_s=10, clock=lambda: now[0])
    assert breaker.allow()
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()  # one probe
    assert not breaker.allow()  # only one
    breaker.failure()
    assert breaker.state == "open"
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_budget_caps_per_provider_and_total(tmp_path: Path) -> None:
    router = make_router(tmp_path, budgets={"openai": 0.10, "total": 0.15})
    router.ledger.record(
        LedgerRow("r1", "h-openai", "openai", False, [None], cost_usd=0.08, gpu_seconds=0)
    )
    router.check_budget("openai", 0.02)  # exactly at the cap is allowed
    with pytest.raises(errors.BudgetExhaustedError) as info:
        router.check_budget("openai", 0.03)
    assert status_of(info.value)[0] == 429 and info.value.code == "budget_exhausted"
    assert "resets at" in info.value.message and info.value.retry_after_s > 0
    with pytest.raises(errors.BudgetExhaustedError, match="overall"):
        router.check_budget("bfl", 0.08)
    router.check_budget("bfl", 0.07)


# ------------------------------------------------------------------ retired models


def test_a_retired_model_is_refused_naming_its_replacement_and_the_setting(tmp_path: Path) -> None:
    router = make_router(tmp_path, providers={"openai": {"api_key": "k"}})
    for retired in ("dall-e-3", "gpt-image-1"):
        with pytest.raises(errors.InvalidRequestError) as caught:
            router.plan(retired, local_only=False)
        assert caught.value.param == "model"
        assert "use model 'gpt-image-2'" in caught.value.message
        assert "providers.openai.map_retired_to_replacement = true" in caught.value.message
    # With no providers.openai section at all, the same (nothing maps it) once the client
    # alias of that name (server.aliases, which serves it locally by default) is turned off.
    with pytest.raises(errors.InvalidRequestError, match="map_retired_to_replacement"):
        make_router(tmp_path, aliases={"dall-e-3": ""}).plan("dall-e-3", local_only=False)


def test_a_mapped_retired_model_is_served_by_its_replacement_with_a_notice(
    tmp_path: Path,
) -> None:
    router = make_router(
        tmp_path,
        providers={"openai": {"api_key": "k", "map_retired_to_replacement": True}},
        fallbacks={"dall-e-3": ["gpt-image-2", "gpt-image-1", "tiny-sdxl"]},
    )
    chain = router.plan("dall-e-3", local_only=False)
    # The replacement is not tried twice, and a retired fallback is left out.
    assert names(chain) == ["gpt-image-2", "tiny-sdxl"]
    assert chain[0].notice == "dall-e-3 is retired: served by gpt-image-2"
    assert chain[1].notice is None


def test_the_users_own_catalogue_decides_what_is_retired_and_what_serves_it(
    tmp_path: Path,
) -> None:
    own = [
        # The user's gpt-image-2 (another OpenAI-compatible host's model id) serves dall-e-3.
        {"name": "gpt-image-2", "kind": "openai", "source": "openai", "provider_model": "gi2-eu"},
        # A server that still offers gpt-image-1: the user's entry names no replacement.
        {"name": "gpt-image-1", "kind": "openai", "source": "openai"},
    ]
    settings = Settings(
        data_dir=tmp_path,
        models=own,
        providers={"openai": {"api_key": "k", "map_retired_to_replacement": True}},
    )
    router = Router(
        settings, Catalogue.load(settings.models), Ledger(open_database(None, path=tmp_path / "d"))
    )
    (served,) = router.plan("dall-e-3", local_only=False)
    assert served.spec.provider_model == "gi2-eu"
    (kept,) = router.plan("gpt-image-1", local_only=False)
    assert kept.spec.name == "gpt-image-1" and kept.notice is None


def test_a_replacement_missing_from_the_catalogue_is_named(tmp_path: Path) -> None:
    own = [{"name": "old", "kind": "openai", "source": "openai", "replacement": "newer"}]
    router = make_router(
        tmp_path,
        models=own,
        providers={"openai": {"api_key": "k", "map_retired_to_replacement": True}},
    )
    with pytest.raises(errors.InvalidRequestError, match="'newer' is not in the catalogue"):
        router.plan("old", local_only=False)


def test_auto_never_routes_to_a_retired_model(tmp_path: Path) -> None:
    router = make_router(
        tmp_path,
        routing_policy="hosted-first",
        providers={"openai": {"api_key": "k", "map_retired_to_replacement": True}},
    )
    chain = names(router.plan("auto", local_only=False))
    assert "gpt-image-2" in chain
    assert "dall-e-3" not in chain and "gpt-image-1" not in chain


def test_local_only_refuses_a_retired_hosted_model_as_hosted(tmp_path: Path) -> None:
    # With a key the name is OpenAI's (without one it is a client alias of a local model).
    router = make_router(
        tmp_path, providers={"openai": {"api_key": "k", "map_retired_to_replacement": True}}
    )
    with pytest.raises(errors.LocalOnlyError):
        router.plan("dall-e-3", local_only=True)
