"""A request as callers make it (`ImageRequest`) and the one step that turns it into generation
parameters: range checks, preset expansion, the prompt screen, the seed. Everything here must
fail before any model loads."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

from models import base
from models.base import GenerationParams
from models.catalogue import Catalogue
from server import errors
from server.presets import PresetBook, PresetError
from server.sanitizer import Sanitizer

MAX_N = 10
MAX_SEED = 2**32 - 1
MAX_STEPS = 200
MAX_GUIDANCE = 50

# How an input image meets the requested size: "crop" scales it to cover the size and cuts
# the overflow evenly (A1111's "Crop and resize", the default: no distortion, no bars),
# "stretch" scales each side to fit ("Just resize"), "pad" fits it inside and fills the rest
# with edge colour ("Resize and fill").
ResizeMode = Literal["crop", "stretch", "pad"]
# Where a mask marks the area to repaint: "white" (imagegen's one convention, A1111's too) or
# "alpha" (OpenAI's edits API: the transparent pixels).
MaskConvention = Literal["white", "alpha"]


@dataclass(frozen=True)
class LoraRequest:
    """A LoRA adapter as a caller names it: a file stem in the library, and its weight."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class ImageRequest:
    """A request as callers make it, before presets, defaults and seeds are applied."""

    prompt: str
    model: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    quality: str | None = None
    style: str | None = None
    preset: str | None = None
    output_format: base.OutputFormat = "png"
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    # Image inputs as the caller sent them (the bytes of any supported file type): decoded,
    # checked and normalised by server.inputs before any model work.
    images: tuple[bytes, ...] = ()
    mask: bytes | None = None
    mask_convention: MaskConvention = "white"
    strength: float | None = None
    mask_blur: int = 0
    inpaint_area: base.InpaintArea = "whole"
    inpaint_padding: int = 32
    resize_mode: ResizeMode = "crop"
    input_fidelity: str | None = None
    # Adapters, besides those named in the prompt as <lora:name:weight>.
    loras: tuple[LoraRequest, ...] = ()
    user: str | None = None
    # Data residency for this request: never leave the host, whatever the server allows.
    local_only: bool = False
    # Groups ledger rows (a batch run id).
    tag: str | None = None
    # The caller's id for this request (the HTTP layer's X-Request-Id); generated when None.
    request_id: str | None = None

    def dropped_by_service(self) -> tuple[str, ...]:
        """Fields no backend uses (`user` is OpenAI's abuse-tracking id: not forwarded)."""
        return ("user",) if self.user is not None else ()


def check_ranges(request: ImageRequest) -> None:
    if not request.prompt or not request.prompt.strip():
        raise errors.InvalidRequestError("prompt must be a non-empty string", param="prompt")
    if not 1 <= request.n <= MAX_N:
        raise errors.InvalidRequestError(
            f"n must be between 1 and {MAX_N}, got {request.n}", param="n"
        )
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED - MAX_N:
        raise errors.InvalidRequestError(
            f"seed must be between 0 and {MAX_SEED - MAX_N}, got {request.seed}", param="seed"
        )
    if request.steps is not None and not 1 <= request.steps <= MAX_STEPS:
        raise errors.InvalidRequestError(
            f"steps must be between 1 and {MAX_STEPS}, got {request.steps}", param="steps"
        )
    if request.guidance_scale is not None and not 0 <= request.guidance_scale <= MAX_GUIDANCE:
        raise errors.InvalidRequestError(
            f"guidance_scale must be between 0 and {MAX_GUIDANCE}, got {request.guidance_scale}",
            param="guidance_scale",
        )


def expand(
    request: ImageRequest,
    *,
    presets: PresetBook,
    sanitizer: Sanitizer,
    catalogue: Catalogue,
    default_model: str,
) -> GenerationParams:
    """Validate, expand the preset, screen the prompt and fix the seed. The result's prompt is
    the revised prompt: what the cache key and every backend see."""
    check_ranges(request)
    try:
        prompt, negative = presets.expand(
            request.preset, request.prompt.strip(), request.negative_prompt
        )
    except PresetError as exc:
        raise errors.InvalidRequestError(str(exc), param="preset") from None
    # Only the positive prompt is screened: negative prompts name what to avoid.
    verdict = sanitizer.check(prompt)
    if verdict.blocked:
        raise errors.PromptBlockedError(verdict.category or "policy")
    model = request.model or default_model
    # An unknown model is reported by the router, after the prompt is screened.
    spec = catalogue.get(model)
    width = request.width or (spec.defaults.width if spec else 1024)
    height = request.height or (spec.defaults.height if spec else 1024)
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED - MAX_N)
    return GenerationParams(
        prompt=prompt,
        model=model,
        width=width,
        height=height,
        n=request.n,
        seed=seed,
        negative_prompt=negative or None,
        steps=request.steps,
        guidance_scale=(
            float(request.guidance_scale) if request.guidance_scale is not None else None
        ),
        scheduler=request.scheduler,
        quality=request.quality,
        style=request.style,
        output_format=request.output_format,
        background=request.background,
        moderation=request.moderation,
        output_compression=request.output_compression,
    )
