"""The backend contract shared by local (diffusers) and hosted (HTTP API) image backends.

Everything here is torch-free: `import models` must stay cheap so the CLI can reject bad input
(and the server can answer /livez) before any heavy library is imported.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# The errors are part of the contract: re-exported so backends import one module.
from models.errors import (
    AuthError,
    BackendError,
    ContentFilteredError,
    DeviceFaultError,
    ImagegenError,
    InvalidParamsError,
    ModelUnavailableError,
    OutOfMemoryError,
    PromptTooLongError,
    QueueFullError,
    TransientBackendError,
    WorkCancelledError,
)

__all__ = [
    "LOCAL_KINDS",
    "NO_EVENTS",
    "AuthError",
    "Backend",
    "BackendError",
    "BackendIdentity",
    "BackendResult",
    "ContentFilteredError",
    "DeviceFaultError",
    "Events",
    "GeneratedImage",
    "GenerationParams",
    "ImagegenError",
    "InpaintArea",
    "InputImage",
    "InvalidParamsError",
    "LoraRef",
    "ModelDefaults",
    "ModelSpec",
    "ModelUnavailableError",
    "OutOfMemoryError",
    "OutputFormat",
    "PromptTooLongError",
    "QueueFullError",
    "Task",
    "TransientBackendError",
    "WorkCancelledError",
]

OutputFormat = Literal["png", "jpeg", "webp"]
# What a request asks of a pipeline: text only, an init image, or an init image and a mask.
Task = Literal["txt2img", "img2img", "inpaint"]
# Inpainting on the whole image, or on a crop around the mask at working resolution ("only
# masked" in A1111), pasted back: the way to touch up a small area of a big image.
InpaintArea = Literal["whole", "masked"]


class Events:
    """What a backend reports while it works, on its way to the client: the one channel from
    the device (or the provider) to whoever waits (the HTTP job runner, the CLI's progress bar,
    a batch). Every method is a no-op here, so a caller that does not listen passes
    `NO_EVENTS` and a backend calls every hook unconditionally.

    Hooks may be called from any thread (the device worker's for `queued` moves, `started` and
    `progress`): an implementation hands them to its own loop, never blocks, and never raises
    (a listener's failure must not take the device down; callers guard with `safely`).

    - `queued(position)`: waiting, 1 = next to run; called on submit and whenever the queue
      ahead moves.
    - `loading(model)`: the model's weights are being loaded (or brought back from host
      RAM) for this request before it can run.
    - `started()`: the work is on the device, or submitted to the provider.
    - `progress(step, total, preview)`: denoising step (local) or the provider's percentage
      mapped onto 100. `preview` is None, or a live preview of the denoising state where the
      listener asked for one at this step: a tuple with one small PIL image per image of the
      request (models.local.previews; a hosted provider shows none).
    - `wants_preview(step, total)`: asked by a local backend before each step's report;
      previews are made only where it says yes, so work nobody watches pays nothing for them.
    - `retry(reason)`: the service runs the request once more (quality check).
    - `fallback(model, reason)`: the model could not serve it; the next one of the route will.
    """

    def queued(self, position: int) -> None:
        pass

    def loading(self, model: str) -> None:
        pass

    def started(self) -> None:
        pass

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        pass

    def wants_preview(self, step: int, total: int) -> bool:
        return False

    def retry(self, reason: str) -> None:
        pass

    def fallback(self, model: str, reason: str) -> None:
        pass


NO_EVENTS = Events()


# --------------------------------------------------------------------------------------------
# Internal types (frozen dataclasses): validated and normalised once at the edge.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDefaults:
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    width: int = 1024
    height: int = 1024


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue entry: what a model name means."""

    name: str
    # One of LOCAL_KINDS (local diffusers pipelines) or models.hosted.HOSTED_KINDS.
    kind: str
    # Hub repo id, local diffusers folder, single-file .safetensors, or "builtin:tiny-sdxl".
    source: str
    defaults: ModelDefaults = ModelDefaults()
    description: str = ""
    # The provider's own model id (hosted), when it differs from `name`.
    provider_model: str | None = None
    # Hosted models that were retired by the provider name their replacement.
    replacement: str | None = None
    revision: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.kind in LOCAL_KINDS


# The kinds of models.local.families' table (one entry each; a test holds them equal), named
# here so that torch-free code (the catalogue, the router) knows local from hosted.
LOCAL_KINDS = frozenset({"sdxl", "sdxl-inpaint", "flux", "flux-kontext", "flux-fill"})


@dataclass(frozen=True)
class InputImage:
    """An input image as every backend receives it: decoded, checked and normalised once at the
    edge (EXIF orientation applied; RGB, or L for a mask, where white = repaint), re-encoded as
    PNG. `sha256` is of the normalised pixels (server.inputs): the cache key's part, so the
    same picture sent with different metadata is still the same input."""

    data: bytes = field(repr=False)
    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class LoraRef:
    """One adapter of a request, as the service resolved it in the LoRA library."""

    name: str  # the file's stem in local.lora_dir
    weight: float
    sha256: str  # of the file: part of the cache key (the same name may be a new file later)


@dataclass(frozen=True)
class GenerationParams:
    """A fully resolved request as a backend sees it: preset expanded, seed concrete,
    per-model defaults applied. Image i has seed `seed + i`."""

    prompt: str
    model: str
    width: int
    height: int
    n: int
    seed: int
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    quality: str | None = None
    style: str | None = None
    output_format: OutputFormat = "png"
    # OpenAI-only knobs passed through to hosted backends that understand them.
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    # Image inputs: () for text-to-image; OpenAI's edits take several reference images, local
    # pipelines use the first. All are the request's size unless inpaint_area is "masked".
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None  # the size of images[0]; white = repaint
    # Share of the schedule re-run on the init image (0 keeps it, 1 ignores it); None = the
    # backend's default.
    strength: float | None = None
    mask_blur: int = 0  # feather (pixels) of the mask where the result is pasted back
    inpaint_area: InpaintArea = "whole"
    inpaint_padding: int = 32  # pixels around the mask's box in "masked" mode
    input_fidelity: str | None = None  # OpenAI edits only
    loras: tuple[LoraRef, ...] = ()
    # Who asked (server.quotas.Caller.id): a device queue shares its turns fairly between
    # owners. Not a pixel field: the same request from two callers is one cache entry.
    owner: str = ""

    @property
    def task(self) -> Task:
        if not self.images:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    @property
    def output_size(self) -> tuple[int, int]:
        """The size of the images made: the input image's in "masked" inpainting (the work
        runs on a crop of it at width x height and is pasted back), the request's otherwise."""
        if self.inpaint_area == "masked" and self.mask is not None:
            return self.images[0].width, self.images[0].height
        return self.width, self.height

    def given(self, *names: str) -> list[str]:
        """Which of `names` are set (not None): what a backend without them must report as
        dropped."""
        return [name for name in names if getattr(self, name) is not None]

    def image_seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + i for i in range(self.n))

    def pixel_fields(self) -> dict[str, Any]:
        """Every field that changes the pixels (the cache key is built from these). The input
        and adapter fields join only when set, so a text-to-image key is what it always was
        (caches written before image inputs existed stay valid)."""
        fields: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "model": self.model,
            "width": self.width,
            "height": self.height,
            "n": self.n,
            "seed": self.seed,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "quality": self.quality,
            "style": self.style,
            "output_format": self.output_format,
            "background": self.background,
            "output_compression": self.output_compression,
        }
        if self.images:
            fields["inputs"] = {
                "task": self.task,
                "images": [image.sha256 for image in self.images],
                "mask": self.mask.sha256 if self.mask is not None else None,
                "strength": self.strength,
                "mask_blur": self.mask_blur,
                "inpaint_area": self.inpaint_area,
                "inpaint_padding": self.inpaint_padding,
                "input_fidelity": self.input_fidelity,
            }
        if self.loras:
            fields["loras"] = [[lora.name, lora.sha256, lora.weight] for lora in self.loras]
        return fields


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes  # encoded image bytes (PNG unless the request asked otherwise)
    seed: int | None  # None where the provider does not report or honour seeds
    width: int
    height: int
    format: OutputFormat = "png"
    # Problems the backend saw in the raw output before encoding ("non-finite values").
    warnings: tuple[str, ...] = ()
    # The 8-bit RGB pixels behind `data` (an HxWx3 numpy array) where the backend has them
    # (local pipelines): quality checks read these instead of decoding the file again.
    pixels: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class BackendResult:
    images: tuple[GeneratedImage, ...]
    provider: str
    # Device time spent on this request (local work; a batch's time split across its images).
    gpu_seconds: float = 0.0
    # What the provider charged, where it says so (usage tokens, credits); None means
    # "use the price table".
    cost_usd: float | None = None
    revised_prompt: str | None = None
    dropped_params: tuple[str, ...] = ()
    notices: tuple[str, ...] = ()
    # Whether the provider honours `seed` so the same request reproduces the same pixels.
    deterministic: bool = True


@dataclass(frozen=True)
class BackendIdentity:
    """What, beyond the request, decides the pixels: part of the cache key."""

    backend: str
    model_revision: str
    pipeline: str = ""
    dtype: str = ""
    device: str = ""
    scheduler_config: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model_revision": self.model_revision,
            "pipeline": self.pipeline,
            "dtype": self.dtype,
            "device": self.device,
            "scheduler_config": dict(self.scheduler_config),
            "extra": dict(self.extra),
        }


class Backend(abc.ABC):
    """One model behind one provider. The service applies sanitizer, seed, cache, quality
    check, cost and ledger around every backend alike; a backend only turns params into
    images."""

    spec: ModelSpec

    @property
    def provider(self) -> str:
        """Short provider id reported in results and the ledger ("local", "openai", ...)."""
        return "local" if self.spec.is_local else self.spec.kind

    @property
    def is_local(self) -> bool:
        return self.spec.is_local

    def reproducible(self, params: GenerationParams) -> bool:
        """Whether `params`, seed included, give the same pixels every time here: then an
        identical request in flight is waited for rather than run again (single flight).
        Local pipelines are; a hosted API only where it says it honours seeds."""
        return self.is_local

    def resolve(self, params: GenerationParams) -> GenerationParams:
        """Fill in per-model defaults (steps, guidance, scheduler) and reject what this
        backend cannot take. Cheap: must not load weights."""
        return params

    def check_prompt(self, prompt: str) -> None:  # noqa: B027 - optional hook
        """Raise PromptTooLongError when `prompt` is over the model's limit (never truncate)."""

    @abc.abstractmethod
    def identity(self, params: GenerationParams) -> BackendIdentity:
        """Pixel-deciding facts beyond the params (revision, dtype, scheduler config)."""

    @abc.abstractmethod
    async def generate(
        self,
        params: GenerationParams,
        events: Events = NO_EVENTS,
        *,
        precise: bool = False,
    ) -> BackendResult:
        """Generate `params.n` images, reporting through `events`. Raises BackendError
        subclasses only.

        `precise` asks for the numerically safest mode (the quality check's one retry after a
        NaN or all-black frame: the VAE in fp32); backends without such a mode ignore it."""

    def unsupported(self, params: GenerationParams) -> str | None:
        """Why this backend cannot honour `params` (an image input, a mask, LoRA), or None.
        Asked for by name, such a request is refused (400); as a fallback, the model is
        skipped: an edit is never silently answered with a text-to-image picture."""
        if params.images:
            return (
                f"model '{self.spec.name}' does not take image inputs; choose one that does "
                "(see README, Which models take inputs)"
            )
        if params.loras:
            return f"model '{self.spec.name}' does not take LoRA adapters; choose a local model"
        return None

    def admit(self, params: GenerationParams) -> None:  # noqa: B027 - optional hook
        """Raise QueueFullError when this backend cannot take `params` now (a look, not a
        reservation: the job API answers 429 before it creates a job)."""

    async def load(self) -> None:  # noqa: B027 - optional hook
        """Load weights / open clients ahead of the first request."""

    @property
    def loaded(self) -> bool:
        return True

    def weights_revision(self) -> str | None:
        """What identifies this model's weights (a local model's cache-key revision,
        models.local.sources: "sha256:<hex>" of a folder's files or of one checkpoint file,
        "hub:<commit>"), where it is known without loading them; None for hosted models (the
        provider's weights) and for weights not on disk. Blocking: the first call for a model
        may hash its files (remembered under the data directory)."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device memory or HTTP clients this backend holds."""

    def estimate_cost_usd(self, params: GenerationParams) -> float | None:
        """The expected cost before running (for budgets and `cheapest` routing)."""
        return None

    def max_cost_usd(self, params: GenerationParams) -> float | None:
        """An upper bound on the cost where no expected figure exists (a token-billed model
        before its first usage report): what a daily budget reserves instead of 0."""
        return None
