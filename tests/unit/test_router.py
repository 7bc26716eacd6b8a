"""Router policies, fallback chains, circuit breakers and budgets (no backends needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.catalogue import Catalogue
from server import errors
from server.db import Database
from server.http.errors import status_of
from server.ledger import Ledger, LedgerRow
from server.router import CircuitBreaker, Router
from server.settings import Settings

HOSTED = [
    {"name": "h-openai", "kind": "openai", "source": "openai", "provider_model": "gpt-image-2"},
    {"name": "h-bfl", "kind": "bfl", "source": "bfl", "provider_model": "flux-pro-1.1"},
]


def make_router(tmp_path: Path, **overrides: Any) -> Router:
    settings = Settings(data_dir=tmp_path, models=HOSTED, **overrides)
    ledger = Ledger(Database(tmp_path / "db.sqlite3"))
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
