"""How much working memory a batch needs on a device, above its model's weights: the
activations of the denoiser, the text encoders' and the VAE decode's, which grow with the image
size and the images in the call. The worker asks before a batch runs and splits one that would
not fit, instead of attempting it and running out of memory.

Estimates come from measured peaks (CUDA's allocator: the peak of the call less what was
allocated before it), kept per model and size as bytes per image, the most seen: linear in
the images of a call, which over-counts the fixed share of a larger batch and so errs safe. A
size not yet measured for a model scales the nearest measured size of it by pixels (attention
runs through SDPA's memory-efficient kernels, linear in tokens), with a margin; a model never
measured (its first batch, or any batch on a CPU, which has no such counter) uses its family's
prior (models.local.families.Family.activation_gib_per_megapixel). Running out of memory is
a measurement too: fewer images than failed are tried at that size from then on, for a while
(`_FORGET_RAN_OUT_S`: what crowded the device, another process say, may have gone).
"""

from __future__ import annotations

import math
import threading
import time

_GIB = 1024**3
# Scaling a measured size to another is an estimate: allowed this much more.
_SCALED_MARGIN = 1.15
_FORGET_RAN_OUT_S = 600.0


class ActivationMemory:
    """Per device: the measured working memory of each (model, width, height)."""

    def __init__(self) -> None:
        self._per_image: dict[tuple[str, int, int], int] = {}
        # The fewest images a call of the size ran out of memory with, and when.
        self._ran_out: dict[tuple[str, int, int], tuple[int, float]] = {}
        # Written on the worker thread, read by /v1/models and the metrics.
        self._lock = threading.Lock()

    def record(self, model: str, width: int, height: int, images: int, peak_bytes: int) -> None:
        """A call of `images` images of `model` at width x height peaked at `peak_bytes` above
        the memory allocated before it."""
        if images <= 0 or peak_bytes <= 0:
            return
        key = (model, width, height)
        per_image = math.ceil(peak_bytes / images)
        with self._lock:
            self._per_image[key] = max(self._per_image.get(key, 0), per_image)

    def ran_out(self, model: str, width: int, height: int, images: int) -> None:
        """A call of `images` images of this size ran out of device memory."""
        key = (model, width, height)
        with self._lock:
            seen = self._ran_out.get(key)
            if seen is None or images <= seen[0] or _forgotten(seen[1]):
                self._ran_out[key] = (images, time.monotonic())

    def per_image(self, model: str, width: int, height: int, prior_bytes: int) -> int:
        """The working memory of one image of `model` at width x height: measured, scaled from
        a measured size, or `prior_bytes` (the family's prior, for this size and dtype)."""
        with self._lock:
            exact = self._per_image.get((model, width, height))
            if exact is not None:
                return exact
            measured = [(w * h, b) for (m, w, h), b in self._per_image.items() if m == model]
        if not measured:
            return prior_bytes
        pixels = width * height
        near_pixels, near_bytes = min(measured, key=lambda pb: abs(math.log(pb[0] / pixels)))
        return math.ceil(near_bytes * pixels / near_pixels * _SCALED_MARGIN)

    def images_that_fit(
        self, model: str, width: int, height: int, prior_bytes: int, room_bytes: int | None
    ) -> int | None:
        """How many images of this size one call may take in `room_bytes` (None: no limit);
        at least 1, since a single image cannot be split further and is tried as it is."""
        with self._lock:
            failed = self._ran_out.get((model, width, height))
        cap = failed[0] - 1 if failed is not None and not _forgotten(failed[1]) else None
        if room_bytes is None:
            return None if cap is None else max(1, cap)
        per_image = self.per_image(model, width, height, prior_bytes)
        fits = room_bytes // max(per_image, 1)
        return max(1, fits if cap is None else min(fits, cap))

    def measured(self) -> dict[tuple[str, int, int], int]:
        with self._lock:
            return dict(self._per_image)


def _forgotten(when: float) -> bool:
    return time.monotonic() - when > _FORGET_RAN_OUT_S


def prior_bytes(gib_per_megapixel: float, width: int, height: int, dtype_bytes: int) -> int:
    """A family's prior for one image at width x height: priors are for half precision (the
    dtype on CUDA); float32 (on a CPU) takes twice as much."""
    return math.ceil(gib_per_megapixel * _GIB * width * height / 1e6 * dtype_bytes / 2)
