"""The local pipeline families (SDXL, Flux): every fact in which they differ, in one table.

A new family, or a new pipeline of a family, is one entry here; the pipeline runner, the
backend and the scheduler table read it. Torch-free: classes are named, and resolved on
diffusers / transformers only where a pipeline is really built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from models.base import ModelUnavailableError, Task
from models.local.schedulers import FLUX_SCHEDULERS, SDXL_SCHEDULERS, SchedulerChoice

# What each task asks of the request, for the reasons a family gives when it lacks one.
_TASK_WORDS: Mapping[Task, str] = MappingProxyType(
    {
        "txt2img": "text-to-image (no input image)",
        "img2img": "an input image without a mask",
        "inpaint": "an input image with a mask",
    }
)


@dataclass(frozen=True)
class PromptTokenizer:
    """The tokenizer whose limit bounds the prompt (imagegen never truncates one)."""

    class_name: str  # on transformers
    subfolder: str  # in a diffusers model folder
    # Tokens the tokenizer adds around every prompt (begin/end), not available to its text.
    special_tokens: int
    # The limit where the weights carry no tokenizer (a single-file checkpoint).
    default_max_length: int


@dataclass(frozen=True)
class Family:
    kind: str  # ModelSpec.kind
    # The architecture the weights are a variant of ("sdxl" | "flux"): what an adapter (LoRA)
    # made for it fits. A dedicated inpainting or Kontext checkpoint is still that model.
    base: str
    # The diffusers pipeline class per task the family can do. The pipeline of `loads` is
    # built from the weights; every other one is made from it with `from_pipe`, sharing its
    # modules (no second copy of the weights in memory).
    pipelines: Mapping[Task, str]
    # The dtype on CUDA (a torch attribute name); CPUs always run float32.
    cuda_dtype: str
    # Width and height must be multiples of this: the VAE's downscale factor (8), times 2
    # where the transformer packs 2x2 latent patches (Flux).
    size_multiple: int
    # The side of the latent patches the transformer packs into one token (2 for Flux; 1 for
    # SDXL's plain latent grid): how step latents unpack into a picture for live previews.
    latent_packing: int
    schedulers: Mapping[str, SchedulerChoice]
    default_scheduler: str
    prompt_tokenizer: PromptTokenizer
    # How a negative prompt reaches the pipeline: "native" (classifier-free guidance takes it
    # as is), "true_cfg" (a guidance-distilled model: only true CFG, with `true_cfg_scale`,
    # can use one, at the cost of a second transformer pass per step) or "none" (the pipeline
    # has no way to take one: it is reported as dropped).
    negative_prompt: Literal["native", "true_cfg", "none"]
    # Whether the prompt's attention syntax (models.prompt_weights) weights the text
    # embeddings (models.local.weighted_embeds: SDXL's two CLIP encoders). Elsewhere the
    # syntax is stripped and reported dropped: Flux's prompt is carried by T5, for which
    # there is no established way to weight tokens (its CLIP gives only a pooled vector).
    prompt_weighting: bool
    # Whether `from_single_file` can build the pipeline from one .safetensors checkpoint.
    single_file: bool
    # Whether the precise retry (after a NaN or black frame) decodes in fp32 through the VAE's
    # force_upcast: fp16 SDXL VAEs overflow; Flux runs bf16, which does not.
    precise_vae: bool
    # The pipeline attribute that holds the denoiser (what torch.compile compiles).
    denoiser: str
    # The working memory (activations, above the weights) one image takes per megapixel in
    # half precision, at the peak of a call: the prior the worker splits batches by until it
    # has measured the model itself (models.local.activations). Sources on each family.
    activation_gib_per_megapixel: float
    # The pipeline attribute of the tokenizer whose limit is passed as max_sequence_length
    # (Flux's T5 carries the prompt); None where the pipeline takes no such argument.
    sequence_length_from: str | None = None
    loads: Task = "txt2img"
    # The default strength of each task whose pipeline takes one (the share of the schedule
    # re-run on the input image); a task absent here takes no strength (Kontext edits by
    # instruction, always from the whole schedule).
    default_strength: Mapping[Task, float] = field(default_factory=dict)
    # Fixed arguments of every pipeline call. Kontext resizes its reference image to one of
    # its trained resolutions by default: imagegen has already brought the image to the
    # request's size (the edge's documented resize mode), so that is turned off.
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def pipeline(self, task: Task | None = None) -> str:
        """The pipeline class of `task`; without one, the class the weights load as."""
        return self.pipelines[task or self.loads]

    def lacks(self, task: Task) -> str | None:
        """Why this family cannot do `task`, or None."""
        if task in self.pipelines:
            return None
        can = " or ".join(_TASK_WORDS[t] for t in self.pipelines)
        return f"{self.kind} models do not take {_TASK_WORDS[task]}; they take {can}"


_CLIP = PromptTokenizer(
    class_name="CLIPTokenizer", subfolder="tokenizer", special_tokens=2, default_max_length=77
)
_T5 = PromptTokenizer(
    class_name="T5TokenizerFast", subfolder="tokenizer_2", special_tokens=1, default_max_length=512
)

# A1111's default denoising strength: enough to change the picture, not to lose it.
_STRENGTH = 0.75

_SDXL = Family(
    kind="sdxl",
    base="sdxl",
    pipelines={
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    },
    cuda_dtype="float16",
    size_multiple=8,
    latent_packing=1,
    schedulers=SDXL_SCHEDULERS,
    default_scheduler="euler",
    prompt_tokenizer=_CLIP,
    negative_prompt="native",
    prompt_weighting=True,
    single_file=True,
    precise_vae=True,
    denoiser="unet",
    # diffusers' SDXL fp16 batch-1 1024x1024 peak, 8.96 GiB (its memory docs, read
    # 2026-12), less the 6.46 GiB of fp16 weights: ~2.4 GiB/MP, most of it the fp32 VAE
    # decode (force_upcast); rounded up.
    activation_gib_per_megapixel=2.5,
    default_strength={"img2img": _STRENGTH, "inpaint": _STRENGTH},
)

# bf16: Flux's activations overflow fp16.
_FLUX = Family(
    kind="flux",
    base="flux",
    pipelines={
        "txt2img": "FluxPipeline",
        "img2img": "FluxImg2ImgPipeline",
        "inpaint": "FluxInpaintPipeline",
    },
    cuda_dtype="bfloat16",
    size_multiple=16,
    latent_packing=2,
    schedulers=FLUX_SCHEDULERS,
    default_scheduler="flow_euler",
    prompt_tokenizer=_T5,
    negative_prompt="true_cfg",
    prompt_weighting=False,
    single_file=False,
    precise_vae=False,
    denoiser="transformer",
    # No published peak separates Flux's activations from its weights; its VAE decode is
    # SDXL's decoder at 16 latent channels, in bf16 (no upcast), and the transformer keeps no
    # activations across its blocks at inference. A first guess (2026-12), replaced by the
    # measured peak of the model's first batch on CUDA.
    activation_gib_per_megapixel=2.0,
    sequence_length_from="tokenizer_2",
    default_strength={"img2img": _STRENGTH, "inpaint": _STRENGTH},
)

FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        "sdxl": _SDXL,
        # The dedicated inpainting checkpoint: a 9-channel UNet (latents, mask, masked image)
        # that only the inpainting pipeline can drive. Its card runs it at strength 0.99: the
        # masked area is repainted from (almost) pure noise.
        "sdxl-inpaint": dataclasses.replace(
            _SDXL,
            kind="sdxl-inpaint",
            pipelines={"inpaint": "StableDiffusionXLInpaintPipeline"},
            loads="inpaint",
            default_strength={"inpaint": 0.99},
        ),
        "flux": _FLUX,
        # FLUX.1 Kontext: edits by instruction, the input image a reference the transformer
        # attends to (not a starting point), so there is no strength; without an image it
        # draws from text like FLUX.1.
        "flux-kontext": dataclasses.replace(
            _FLUX,
            kind="flux-kontext",
            pipelines={"txt2img": "FluxKontextPipeline", "img2img": "FluxKontextPipeline"},
            default_strength={},
            call_kwargs={"_auto_resize": False},
        ),
        # FLUX.1 Fill: a transformer conditioned on the masked image and the mask, inpainting
        # (and outpainting) only; the card runs it at the full schedule.
        "flux-fill": dataclasses.replace(
            _FLUX,
            kind="flux-fill",
            pipelines={"inpaint": "FluxFillPipeline"},
            loads="inpaint",
            negative_prompt="none",
            default_strength={"inpaint": 1.0},
        ),
    }
)


def family(kind: str) -> Family:
    try:
        return FAMILIES[kind]
    except KeyError:
        raise ModelUnavailableError(
            f"model kind '{kind}' is not a local pipeline family; local kinds are "
            f"{', '.join(FAMILIES)}"
        ) from None
