"""The router: which model (and so which backend) serves a request — `auto` policies, fallback
chains, per-provider circuit breakers, daily budgets and the local-only guarantee."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from models.base import ModelSpec
from models.catalogue import Catalogue
from server import errors
from server.aliases import Alias, AliasTable
from server.ledger import Ledger, utc_day_start
from server.settings import Settings

Clock = Callable[[], float]


@dataclass
class CircuitBreaker:
    """Closed until `threshold` consecutive failures; then open for `cooldown_s`, after which
    one probe request is let through (half-open): success closes it, failure re-opens it."""

    threshold: int = 3
    cooldown_s: float = 30.0
    clock: Clock = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.cooldown_s:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = self.clock()

    def release(self) -> None:
        """The attempt told nothing about the provider's health (cancelled, or turned away by
        a full queue): a probe it held may be made by the next request."""
        self.probing = False


class Admission:
    """One attempt's standing with its provider's circuit breaker; the outcome is recorded
    once, whatever it was."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def succeeded(self) -> None:
        self.breaker.success()

    def failed(self, exc: errors.ImagegenError) -> None:
        if isinstance(exc, errors.RateLimitedError):
            # A full queue is overload, not an outage: it must never open the circuit (which
            # would turn the next requests' 429s into 502s).
            self.breaker.release()
        elif exc.transient:
            self.breaker.failure()
        else:
            # The provider answered (a refusal or bad input is not an outage).
            self.breaker.success()

    def abandoned(self) -> None:
        self.breaker.release()


@dataclass(frozen=True)
class Candidate:
    spec: ModelSpec
    # Told to the client when this candidate serves the request ("dall-e-3 is retired:
    # served by gpt-image-2").
    notice: str | None = None


@dataclass
class Router:
    settings: Settings
    catalogue: Catalogue
    ledger: Ledger
    clock: Clock = time.monotonic
    wall_clock: Callable[[], float] = time.time
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    aliases: AliasTable = field(init=False)

    def __post_init__(self) -> None:
        self.aliases = AliasTable.load(
            alias_model=self.settings.alias_target, user=self.settings.aliases
        )

    # -- planning ------------------------------------------------------------------------

    def local_only(self, requested: bool) -> bool:
        return requested or self.settings.local_only or self.settings.routing_policy == "local-only"

    def plan(
        self,
        model: str,
        *,
        local_only: bool,
        estimate: Callable[[ModelSpec], float | None] | None = None,
    ) -> list[Candidate]:
        """The models to try, in order. A hosted model under local-only is refused outright
        (never silently replaced by a local one); fallbacks that are hosted are left out. A
        retired model (its catalogue entry names a `replacement`) is refused, or served by the
        replacement where its provider's `map_retired_to_replacement` says so. A client alias
        (server.aliases: dall-e-3 with no OpenAI key) is planned as the model it maps to, and
        says so in a notice."""
        if model == "auto":
            # Retired entries are reachable by name only: `auto` never picks one.
            pool = self._auto_pool(local_only, estimate)
            chain = [Candidate(s) for s in pool if not s.replacement]
            if not chain:
                raise errors.ModelNotFoundError(
                    "model 'auto' has no model to route to; set default_model to a local model "
                    "or configure a provider (providers.NAME.api_key)",
                    param="model",
                )
            return chain
        alias = self.alias(model)
        target = alias.target if alias is not None else model
        spec = self.catalogue.get(target)
        if spec is None:
            if alias is None:
                raise errors.ModelNotFoundError.for_model(model)
            raise errors.ModelNotFoundError(
                f"model '{model}' is an alias of '{target}', which is not in the catalogue; "
                f"set {alias.setting} to a model of `imagegen models`",
                param="model",
            )
        self._refuse_hosted(spec, local_only)
        first = self._unretired(spec)
        self._refuse_hosted(first.spec, local_only)
        if alias is not None:
            told = [alias.notice, *([first.notice] if first.notice else [])]
            first = Candidate(first.spec, notice="; ".join(told))
        chain = [first]
        seen = {model, target, first.spec.name}
        # An alias's own fallbacks where the user set them, else its target's.
        fallbacks = self.settings.fallbacks.get(model) or self.settings.fallbacks.get(target, [])
        for name in fallbacks:
            fallback = self.catalogue.get(name)
            if fallback is None or name in seen or (local_only and not fallback.is_local):
                continue
            if fallback.replacement:
                continue  # a retired fallback would only fail or repeat its replacement
            seen.add(name)
            chain.append(Candidate(fallback))
        return chain

    def alias(self, model: str) -> Alias | None:
        """The alias `model` stands for here (None where it names itself)."""
        return self.aliases.resolve(
            model, catalogue=self.catalogue, openai_ready=self.openai_ready()
        )

    def active_aliases(self) -> list[Alias]:
        return self.aliases.active(catalogue=self.catalogue, openai_ready=self.openai_ready())

    def openai_ready(self) -> bool:
        """Whether OpenAI's names mean OpenAI here: its key is set. Local-only does not change
        what a name means: a hosted name stays refused under it, never silently replaced."""
        config = self.settings.providers.get("openai")
        return config is not None and config.api_key is not None

    @staticmethod
    def _refuse_hosted(spec: ModelSpec, local_only: bool) -> None:
        if local_only and not spec.is_local:
            raise errors.LocalOnlyError(
                f"model '{spec.name}' is hosted by {spec.kind} and local-only mode is on: no "
                "prompt or image may leave this host. Choose a local model (`imagegen models`)",
                param="model",
            )

    def _unretired(self, spec: ModelSpec) -> Candidate:
        """`spec` itself, or for a retired entry the replacement this catalogue defines (the
        user's own entry of that name wins), when the retired model's provider maps it."""
        served = spec
        passed = {spec.name}
        while served.replacement:
            provider = served.source or served.kind
            setting = f"providers.{provider}.map_retired_to_replacement"
            replacement = self.catalogue.get(served.replacement)
            if replacement is None or replacement.name in passed:
                problem = "is not in the catalogue" if replacement is None else "is retired too"
                raise errors.InvalidRequestError(
                    f"model '{served.name}' is retired and its replacement "
                    f"'{served.replacement}' {problem}; choose another model (`imagegen "
                    f"models`) or add a [[models]] entry named '{served.replacement}' without "
                    "`replacement`",
                    param="model",
                )
            config = self.settings.providers.get(provider)
            if config is None or not config.map_retired_to_replacement:
                raise errors.InvalidRequestError(
                    f"model '{served.name}' is retired; use model '{replacement.name}' instead, "
                    f"or set {setting} = true to have it served by '{replacement.name}'",
                    param="model",
                )
            passed.add(replacement.name)
            served = replacement
        if served is spec:
            return Candidate(spec)
        return Candidate(served, notice=f"{spec.name} is retired: served by {served.name}")

    def _auto_pool(
        self, local_only: bool, estimate: Callable[[ModelSpec], float | None] | None
    ) -> list[ModelSpec]:
        default = self.catalogue.get(self.settings.default_model)
        local = [s for s in [default] if s is not None and s.is_local]
        hosted = (
            []
            if local_only
            else [
                s
                for s in (self.catalogue.specs[n] for n in self.catalogue.names())
                if not s.is_local and self.provider_configured(s)
            ]
        )
        policy = self.settings.routing_policy
        if policy == "hosted-first":
            return hosted + local
        if policy == "cheapest":
            pool = local + hosted

            def price(spec: ModelSpec) -> float:
                value = estimate(spec) if estimate is not None else None
                return float("inf") if value is None else value

            return sorted(pool, key=price)
        return local + hosted

    def provider_configured(self, spec: ModelSpec) -> bool:
        return (spec.source or spec.kind) in self.settings.providers

    # -- admission -----------------------------------------------------------------------

    def admit(self, provider: str, reserve: Callable[[], float]) -> Admission:
        """Whether an attempt on `provider` may run now: within the daily budgets (`reserve`
        is what it would hold back, computed only where a cap applies) and with the circuit
        closed (or this attempt the half-open probe)."""
        if self.has_budget(provider):
            self.check_budget(provider, reserve())
        breaker = self.breaker(provider)
        if not breaker.allow():
            raise errors.ProviderError(
                f"{provider} is failing repeatedly (circuit open); it is probed again shortly",
                transient=True,
            )
        return Admission(breaker)

    # -- circuit breakers ----------------------------------------------------------------

    def breaker(self, provider: str) -> CircuitBreaker:
        if provider not in self.breakers:
            self.breakers[provider] = CircuitBreaker(clock=self.clock)
        return self.breakers[provider]

    # -- budgets -------------------------------------------------------------------------

    def day_start(self) -> float:
        return utc_day_start(self.wall_clock())

    def has_budget(self, provider: str) -> bool:
        """Whether any cap applies to `provider` (so the estimate is worth computing)."""
        return provider in self.settings.budgets or "total" in self.settings.budgets

    def check_budget(self, provider: str, estimate_usd: float) -> None:
        """Refuse work that would take today's spend (UTC day) past a cap: the provider's own
        and the overall `total`."""
        caps: Sequence[tuple[str, str | None]] = [(provider, provider), ("total", None)]
        since = self.day_start()
        for cap_name, scope in caps:
            cap = self.settings.budgets.get(cap_name)
            if cap is None:
                continue
            spent = self.ledger.spent_since(since, scope)
            if spent + estimate_usd > cap + 1e-12:
                resets = since + 86400
                reset_at = dt.datetime.fromtimestamp(resets, tz=dt.UTC).isoformat()
                label = "overall" if scope is None else f"'{provider}'"
                raise errors.BudgetExhaustedError(
                    f"the {label} daily budget of ${cap:.2f} would be passed (spent "
                    f"${spent:.4f} today, this request about ${estimate_usd:.4f}); it resets "
                    f"at {reset_at}. Raise budgets.{cap_name} to allow more",
                    retry_after_s=max(1, int(resets - self.wall_clock())),
                )
