"""A request as callers make it (`ImageRequest`) and the one step that turns it into generation
parameters: range checks, preset expansion, the prompt screen, the seed. Everything here must
fail before any model loads."""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from models import base
from models.base import GenerationParams
from models.catalogue import Catalogue
from server import errors
from server.inputs import decode_inputs
from server.presets import PresetBook, PresetError
from server.quotas import IN_PROCESS, Caller
from server.sanitizer import Sanitizer

MAX_N = 10
MAX_SEED = 2**32 - 1
MAX_STEPS = 200
MAX_GUIDANCE = 50
MAX_LORAS = 8
MAX_LORA_WEIGHT = 10.0
MAX_MASK_BLUR = 64
MAX_INPAINT_PADDING = 512

# A1111's prompt syntax for adapters: <lora:NAME> or <lora:NAME:WEIGHT>.
_LORA_TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>", re.IGNORECASE)

# How an input image meets the requested size: "crop" scales it to cover the size and cuts
# the overflow evenly (A1111's "Crop and resize", the default: no distortion, no bars),
# "stretch" scales each side to fit ("Just resize"), "pad" fits it inside and fills the rest
# with edge colour ("Resize and fill").
ResizeMode = Literal["crop", "stretch", "pad"]
# Where a mask marks the area to repaint: "white" (imagegen's one convention, A1111's too),
# "black" (A1111's inpainting_mask_invert) or "alpha" (OpenAI's edits API: the transparent
# pixels).
MaskConvention = Literal["white", "black", "alpha"]


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
    # Who it is for (the API key, with its limits): the ledger's caller, the owner the device
    # queue shares turns between, and the daily quotas that apply.
    caller: Caller = IN_PROCESS

    def dropped_by_service(self) -> tuple[str, ...]:
        """Fields no backend uses (`user` is OpenAI's abuse-tracking id: not forwarded)."""
        return ("user",) if self.user is not None else ()


def names_loras(prompt: str) -> bool:
    """Whether `prompt` holds a <lora:...> tag (the same pattern split_lora_tags removes)."""
    return _LORA_TAG.search(prompt) is not None


def split_lora_tags(prompt: str) -> tuple[str, tuple[LoraRequest, ...]]:
    """The prompt without its <lora:name:weight> tags (what is encoded, and what the revised
    prompt shows), and the adapters the tags name, in order."""
    found: list[LoraRequest] = []

    def take(match: re.Match[str]) -> str:
        name, weight = match.group(1).strip(), match.group(2)
        try:
            value = float(weight) if weight is not None and weight.strip() else 1.0
        except ValueError:
            raise errors.InvalidRequestError(
                f"prompt: {match.group(0)} has weight '{weight}', not a number; write "
                "<lora:NAME:WEIGHT>, for example <lora:watercolor:0.8>",
                param="prompt",
            ) from None
        found.append(LoraRequest(name=name, weight=value))
        return " "

    text = _LORA_TAG.sub(take, prompt)
    return " ".join(text.split()), tuple(found)


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
    if request.strength is not None and not 0 < request.strength <= 1:
        raise errors.InvalidRequestError(
            f"strength must be above 0 and at most 1 (the share of the schedule re-run on the "
            f"image), got {request.strength}",
            param="strength",
        )
    if request.strength is not None and not request.images:
        raise errors.InvalidRequestError(
            "strength applies to image inputs only: send an image, or leave strength out",
            param="strength",
        )
    if not 0 <= request.mask_blur <= MAX_MASK_BLUR:
        raise errors.InvalidRequestError(
            f"mask_blur must be between 0 and {MAX_MASK_BLUR} pixels, got {request.mask_blur}",
            param="mask_blur",
        )
    if not 0 <= request.inpaint_padding <= MAX_INPAINT_PADDING:
        raise errors.InvalidRequestError(
            f"inpaint_padding must be between 0 and {MAX_INPAINT_PADDING} pixels, got "
            f"{request.inpaint_padding}",
            param="inpaint_padding",
        )


def check_loras(loras: tuple[LoraRequest, ...]) -> None:
    if len(loras) > MAX_LORAS:
        raise errors.InvalidRequestError(
            f"loras: at most {MAX_LORAS} adapters per request, got {len(loras)}", param="loras"
        )
    names = [lora.name for lora in loras]
    for lora in loras:
        if not lora.name:
            raise errors.InvalidRequestError(
                "loras: an adapter has an empty name; name a file of `imagegen loras`",
                param="loras",
            )
        if not (math.isfinite(lora.weight) and abs(lora.weight) <= MAX_LORA_WEIGHT):
            raise errors.InvalidRequestError(
                f"loras: weight of '{lora.name}' must be between -{MAX_LORA_WEIGHT:g} and "
                f"{MAX_LORA_WEIGHT:g}, got {lora.weight}",
                param="loras",
            )
        if names.count(lora.name) > 1:
            raise errors.InvalidRequestError(
                f"loras: '{lora.name}' is named twice (in the prompt and the loras field, or "
                "twice in one); name each adapter once with its weight",
                param="loras",
            )


def expand(
    request: ImageRequest,
    *,
    presets: PresetBook,
    sanitizer: Sanitizer,
    catalogue: Catalogue,
    default_model: str,
    find_lora: Callable[[str], base.LoraRef],
    max_input_megapixels: float,
) -> GenerationParams:
    """Validate, expand the preset, screen the prompt, resolve the adapters, decode the input
    images and fix the seed. The result's prompt is the revised prompt (without <lora:> tags):
    what the cache key and every backend see. `find_lora(name)` gives the library's file
    (weight 0 here: the request's weight is set on it)."""
    check_ranges(request)
    try:
        prompt, negative = presets.expand(
            request.preset, request.prompt.strip(), request.negative_prompt
        )
    except PresetError as exc:
        raise errors.InvalidRequestError(str(exc), param="preset") from None
    # Only the positive prompt is screened: negative prompts name what to avoid.
    prompt, tagged = split_lora_tags(prompt)
    if not prompt:
        raise errors.InvalidRequestError(
            "prompt must hold text besides its <lora:...> tags", param="prompt"
        )
    requested = (*tagged, *request.loras)
    check_loras(requested)
    verdict = sanitizer.check(prompt)
    if verdict.blocked:
        raise errors.PromptBlockedError(verdict.category or "policy")
    loras = tuple(replace(find_lora(lora.name), weight=lora.weight) for lora in requested)
    inputs = decode_inputs(request, max_megapixels=max_input_megapixels)
    model = request.model or default_model
    # An unknown model is reported by the router, after the prompt is screened.
    spec = catalogue.get(model)
    width = request.width or (spec.defaults.width if spec else 1024)
    height = request.height or (spec.defaults.height if spec else 1024)
    if inputs is not None:
        width, height = inputs.width or width, inputs.height or height
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
        images=inputs.images if inputs is not None else (),
        mask=inputs.mask if inputs is not None else None,
        strength=request.strength,
        mask_blur=request.mask_blur,
        inpaint_area=request.inpaint_area,
        inpaint_padding=request.inpaint_padding,
        input_fidelity=request.input_fidelity,
        loras=loras,
        owner=request.caller.id,
    )
