"""What local work costs in USD: amortized GPU-seconds at the configured (or derived) rate.
Hosted work is priced by the provider's own figure or models/prices.py; measured local
throughput for estimates comes from the ledger."""

from __future__ import annotations

from server.settings import CostSettings


class CostModel:
    def __init__(self, settings: CostSettings) -> None:
        self.usd_per_gpu_hour = settings.gpu_hour_usd()

    def local_usd(self, gpu_seconds: float) -> float:
        return gpu_seconds * self.usd_per_gpu_hour / 3600.0
