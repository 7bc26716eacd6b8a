"""What a generation costs in USD: amortized GPU-seconds for local work, the provider's own
figure or the dated price table for hosted work."""

from __future__ import annotations

from server.settings import CostSettings


class CostModel:
    def __init__(self, settings: CostSettings) -> None:
        self.usd_per_gpu_hour = settings.gpu_hour_usd()
        # Measured local throughput (device seconds per image, by model) for estimates.
        self._seconds_per_image: dict[str, float] = {}

    def local_usd(self, gpu_seconds: float) -> float:
        return gpu_seconds * self.usd_per_gpu_hour / 3600.0

    def observe_local(self, model: str, gpu_seconds: float, images: int) -> None:
        if images <= 0:
            return
        per_image = gpu_seconds / images
        prev = self._seconds_per_image.get(model)
        self._seconds_per_image[model] = per_image if prev is None else 0.7 * prev + 0.3 * per_image

    def seconds_per_image(self, model: str) -> float | None:
        return self._seconds_per_image.get(model)

    def estimate_local_usd(self, model: str, images: int) -> float | None:
        per_image = self._seconds_per_image.get(model)
        return None if per_image is None else self.local_usd(per_image * images)
