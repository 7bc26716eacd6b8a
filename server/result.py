"""What a caller gets back (`GenerationResult`), and the two ways one is made: from a backend's
fresh images (checked, parameters embedded in every PNG) or from a cache entry."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from models.base import GeneratedImage, GenerationParams
from server import pngmeta
from server.cache import CacheEntry
from server.quality import QualityReport, check_image, check_pixels


@dataclass(frozen=True)
class ResultImage:
    data: bytes
    sha256: str
    seed: int | None
    width: int
    height: int
    format: str
    quality: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    model: str
    provider: str
    cached: bool
    images: tuple[ResultImage, ...]
    # The prompt as generated: the preset's expansion, or the provider's own rewrite where it
    # reports one (OpenAI, a remote imagegen).
    revised_prompt: str
    negative_prompt: str | None
    params: GenerationParams
    cost_usd: float
    gpu_seconds: float
    saved_usd: float = 0.0
    dropped_params: tuple[str, ...] = ()
    notices: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    cache_key: str = ""
    # Models of the route that could not serve it before the one that did.
    fallback_from: tuple[str, ...] = ()

    @property
    def seeds(self) -> list[int | None]:
        return [img.seed for img in self.images]


def check(image: GeneratedImage, params: GenerationParams, *, exact_size: bool) -> QualityReport:
    """The quality check of one image. Local pipelines must produce the requested size; hosted
    ones may map it (aspect ratios, Midjourney grids), so theirs must be the size they declare."""
    width, height = params.output_size if exact_size else (image.width, image.height)
    if image.pixels is not None:
        report = check_pixels(image.pixels, width=width, height=height)
    else:
        report = check_image(image.data, width=width, height=height, format=image.format)
    if "non-finite values" in image.warnings and report.ok:
        return dataclasses.replace(report, ok=False, retryable=True, reason="non-finite values")
    return report


def with_metadata(
    images: Sequence[GeneratedImage],
    params: GenerationParams,
    identity: Mapping[str, Any],
    provider: str,
) -> list[GeneratedImage]:
    """Embed the generation parameters in every PNG so the file reproduces itself."""
    finished = []
    for img in images:
        if img.format != "png":
            finished.append(img)
            continue
        seed = img.seed if img.seed is not None else params.seed
        single = dataclasses.replace(params, seed=seed, n=1)
        text = pngmeta.a1111_parameters(
            params.prompt,
            params.negative_prompt,
            steps=params.steps,
            sampler=params.scheduler,
            cfg_scale=params.guidance_scale,
            seed=seed,
            width=img.width,
            height=img.height,
            model=params.model,
            model_hash=str(identity.get("model_revision", ""))[:17] or None,
            denoising_strength=params.strength if params.images else None,
            mask_blur=params.mask_blur if params.mask is not None else None,
            loras=[(lora.name, lora.weight, lora.sha256) for lora in params.loras],
        )
        record = {
            "request": single.pixel_fields(),
            "seed": seed,
            "model": params.model,
            "provider": provider,
            "model_revision": identity.get("model_revision"),
            "backend": identity.get("backend"),
        }
        data = pngmeta.embed(img.data, parameters=text, record=record)
        finished.append(dataclasses.replace(img, data=data))
    return finished


def result_images(
    images: Sequence[GeneratedImage], reports: Sequence[QualityReport]
) -> tuple[ResultImage, ...]:
    return tuple(
        ResultImage(
            data=img.data,
            sha256=hashlib.sha256(img.data).hexdigest(),
            seed=img.seed,
            width=img.width,
            height=img.height,
            format=img.format,
            quality=rep.as_dict(),
        )
        for img, rep in zip(images, reports, strict=True)
    )


def cached_images(entry: CacheEntry) -> tuple[ResultImage, ...]:
    quality = list(entry.meta.get("quality") or [{} for _ in entry.images])
    return tuple(
        ResultImage(
            data=img.data,
            sha256=img.sha256,
            seed=img.seed,
            width=img.width,
            height=img.height,
            format=img.format,
            quality=dict(q),
        )
        for img, q in zip(entry.images, quality, strict=False)
    )
