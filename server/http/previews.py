"""Live previews on the wire: which steps show one, and the preview images a local backend hands
its listeners (`models.base.Events.progress`) encoded as base64 text. Encoding happens in the
listener's hook, on the device worker's thread, and only for a preview someone asked for."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

# JPEG and WebP previews: small pictures of a noisy state, no need for more.
_LOSSY_QUALITY = 80


def encoded(image: Any, output_format: str = "png") -> str:
    """One preview (a PIL image) as base64 text in `output_format` (png, jpeg or webp)."""
    buf = io.BytesIO()
    if output_format == "png":
        # Fast over small: a preview is sent once and replaced a few steps later.
        image.save(buf, format="PNG", compress_level=1)
    else:
        image.save(buf, format=output_format.upper(), quality=_LOSSY_QUALITY)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def every(step: int, interval: int) -> bool:
    """Whether `step` shows a preview when one is wanted every `interval` steps (0: never)."""
    return interval > 0 and step % interval == 0


def spread(total: int, count: int) -> frozenset[int]:
    """The steps of a `total`-step schedule at which `count` previews fall, evenly spaced and
    before the end where there is room (4 steps, 3 previews: steps 1, 2 and 3). One preview
    per step at most: a schedule shorter than `count` gives one at every step."""
    return frozenset(min(total, math.ceil(total * i / (count + 1))) for i in range(1, count + 1))
