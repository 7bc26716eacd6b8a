"""What work costs in USD, in one place: the charge of finished work (the provider's own figure,
the price table, or amortized GPU-seconds) and the estimate before running it, with its basis —
the one estimator behind `cheapest` routing, daily budgets, batch budgets and dry runs."""

from __future__ import annotations

from dataclasses import dataclass

from models.base import Backend, BackendResult, GenerationParams
from server.ledger import Ledger
from server.settings import CostSettings

# Local seconds per image assumed before a model has run here (a full-size SDXL image on a
# 4090-class card is about 5 s; CPUs are slower): what `cheapest` and budgets use until the
# ledger has measured throughput.
DEFAULT_LOCAL_SECONDS_PER_IMAGE = 10.0


@dataclass(frozen=True)
class Estimate:
    """Expected USD before running, and where the figure comes from (shown by dry runs)."""

    usd: float | None
    basis: str

    @property
    def known(self) -> bool:
        return self.usd is not None


class Costs:
    def __init__(self, settings: CostSettings, ledger: Ledger) -> None:
        self.usd_per_gpu_hour = settings.gpu_hour_usd()
        self.ledger = ledger

    def local_usd(self, gpu_seconds: float) -> float:
        return gpu_seconds * self.usd_per_gpu_hour / 3600.0

    def charged(self, result: BackendResult, backend: Backend, params: GenerationParams) -> float:
        """What finished work cost: the provider's own figure (usage, credits) where it gave
        one, GPU-seconds for local work, else the price table."""
        if result.cost_usd is not None:
            return float(result.cost_usd)
        if backend.is_local:
            return self.local_usd(result.gpu_seconds)
        return float(backend.estimate_cost_usd(params) or 0.0)

    def estimate(self, backend: Backend, params: GenerationParams) -> Estimate:
        """The expected cost of `params` on `backend`: measured GPU-seconds for local models;
        the price table, else the model's past average here, for hosted ones."""
        if backend.is_local:
            seconds = self.ledger.seconds_per_image(params.model)
            if seconds is None:
                return Estimate(None, "no measured throughput yet (never run here)")
            return Estimate(
                self.local_usd(seconds * params.n),
                f"measured {seconds:.4f} s/image x ${self.usd_per_gpu_hour:g}/GPU-hour",
            )
        quoted = backend.estimate_cost_usd(params)
        if quoted is not None:
            return Estimate(float(quoted), "provider price table")
        past = self.ledger.usd_per_image(params.model)
        if past is not None:
            return Estimate(past * params.n, f"past average ${past:.4f}/image (billed by usage)")
        return Estimate(None, "no price per image (billed by usage) and no past requests")

    def reserve(self, backend: Backend, params: GenerationParams) -> float:
        """What a budget holds back for `params`: the estimate where there is one, else a
        conservative bound — never 0 for work that costs money. A token-billed model before
        its first usage report reserves the backend's upper bound (largest output for the size
        and quality at the published token price); a local model the default throughput."""
        expected = self.estimate(backend, params).usd
        if expected is not None:
            return expected
        if backend.is_local:
            return self.local_usd(DEFAULT_LOCAL_SECONDS_PER_IMAGE * params.n)
        return float(backend.max_cost_usd(params) or 0.0)
