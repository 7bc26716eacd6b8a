"""What hosted providers send back: image payloads (base64, bytes), one image's Piece with its
cost, and the fan-out of an n-image request into one provider call per image."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from models.base import BackendError, ContentFilteredError, Events, GeneratedImage, OutputFormat

# How far one image has come, 0..1 (a provider's progress, or 1 when it is done).
Report = Callable[[float], None]

_PIL_FORMATS: Mapping[str, OutputFormat] = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def decode_b64(text: Any, provider: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise BackendError(f"{provider}: the response carries no base64 image", provider=provider)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BackendError(
            f"{provider}: the response's image is not valid base64", provider=provider
        ) from None


def to_image(data: bytes, *, provider: str, seed: int | None) -> GeneratedImage:
    """Read the real size and format from the bytes (providers do not always honour the
    requested size: aspect-ratio-only APIs, Midjourney grids)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            fmt = _PIL_FORMATS.get(img.format or "")
    except (UnidentifiedImageError, OSError):
        raise BackendError(
            f"{provider}: the provider returned data that is not an image", provider=provider
        ) from None
    if fmt is None:
        raise BackendError(
            f"{provider}: the provider returned an image in an unsupported format",
            provider=provider,
        )
    return GeneratedImage(data=data, seed=seed, width=width, height=height, format=fmt)


@dataclass(frozen=True)
class Piece:
    """One image from one provider call, with what that call cost (None: not known)."""

    image: GeneratedImage
    cost_usd: float | None = None


async def fan_out(
    count: int,
    one: Callable[[int, Report], Awaitable[Piece]],
    events: Events,
) -> list[Piece]:
    """Make `count` images with one provider call each (`one(index, report)`), all at once.

    Progress is the mean of the images' shares on 0..100, reported as it moves: each call's
    own reports while it polls, and 1 for each image that is done.

    Every call runs to its end, so what each one cost is known. If any failed, one error is
    raised (a content filter first: it must never go to a fallback) and its `charged_usd` is
    everything already billed: the images that were made and the failed calls' own charges.
    The service books that, so an image paid for is never lost with the request."""
    shares = [0.0] * count
    shown = -1

    def report(index: int, fraction: float) -> None:
        nonlocal shown
        shares[index] = max(shares[index], min(max(fraction, 0.0), 1.0))
        percent = int(100 * sum(shares) / count)
        if percent != shown:
            shown = percent
            events.progress(percent, 100)

    async def run(index: int) -> Piece:
        piece = await one(index, lambda fraction: report(index, fraction))
        report(index, 1.0)
        return piece

    results = await asyncio.gather(*(run(i) for i in range(count)), return_exceptions=True)
    pieces = [r for r in results if isinstance(r, Piece)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if not failures:
        return pieces
    error = next((e for e in failures if isinstance(e, ContentFilteredError)), failures[0])
    if isinstance(error, BackendError):
        error.charged_usd = round(
            sum(p.cost_usd or 0.0 for p in pieces)
            + sum(e.charged_usd for e in failures if isinstance(e, BackendError)),
            8,
        )
    raise error


def total_cost(pieces: Sequence[Piece]) -> float | None:
    if any(p.cost_usd is None for p in pieces):
        return None
    return sum(p.cost_usd or 0.0 for p in pieces)
