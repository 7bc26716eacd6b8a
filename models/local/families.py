"""The local pipeline families (SDXL, Flux): every fact in which they differ, in one table.

A new family, or a new pipeline of a family, is one entry here; the pipeline runner, the
backend and the scheduler table read it. Torch-free: classes are named, and resolved on
diffusers / transformers only where a pipeline is really built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from models.base import ModelUnavailableError
from models.local.schedulers import FLUX_SCHEDULERS, SDXL_SCHEDULERS, SchedulerChoice

# What a pipeline makes. Only text-to-image today; img2img and inpainting join here.
Task = Literal["txt2img"]


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
    pipelines: Mapping[Task, str]  # diffusers pipeline class per task
    # The dtype on CUDA (a torch attribute name); CPUs always run float32.
    cuda_dtype: str
    # Width and height must be multiples of this: the VAE's downscale factor (8), times 2
    # where the transformer packs 2x2 latent patches (Flux).
    size_multiple: int
    schedulers: Mapping[str, SchedulerChoice]
    default_scheduler: str
    prompt_tokenizer: PromptTokenizer
    # How a negative prompt reaches the pipeline: "native" (classifier-free guidance takes it
    # as is) or "true_cfg" (a guidance-distilled model: only true CFG, with `true_cfg_scale`,
    # can use one, at the cost of a second transformer pass per step).
    negative_prompt: Literal["native", "true_cfg"]
    # Whether `from_single_file` can build the pipeline from one .safetensors checkpoint.
    single_file: bool
    # Whether the precise retry (after a NaN or black frame) decodes in fp32 through the VAE's
    # force_upcast: fp16 SDXL VAEs overflow; Flux runs bf16, which does not.
    precise_vae: bool
    # The pipeline attribute that holds the denoiser (what torch.compile compiles).
    denoiser: str
    # The pipeline attribute of the tokenizer whose limit is passed as max_sequence_length
    # (Flux's T5 carries the prompt); None where the pipeline takes no such argument.
    sequence_length_from: str | None = None

    def pipeline(self, task: Task = "txt2img") -> str:
        return self.pipelines[task]


_CLIP = PromptTokenizer(
    class_name="CLIPTokenizer", subfolder="tokenizer", special_tokens=2, default_max_length=77
)
_T5 = PromptTokenizer(
    class_name="T5TokenizerFast", subfolder="tokenizer_2", special_tokens=1, default_max_length=512
)

FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        "sdxl": Family(
            kind="sdxl",
            pipelines={"txt2img": "StableDiffusionXLPipeline"},
            cuda_dtype="float16",
            size_multiple=8,
            schedulers=SDXL_SCHEDULERS,
            default_scheduler="euler",
            prompt_tokenizer=_CLIP,
            negative_prompt="native",
            single_file=True,
            precise_vae=True,
            denoiser="unet",
        ),
        # bf16: Flux's activations overflow fp16.
        "flux": Family(
            kind="flux",
            pipelines={"txt2img": "FluxPipeline"},
            cuda_dtype="bfloat16",
            size_multiple=16,
            schedulers=FLUX_SCHEDULERS,
            default_scheduler="flow_euler",
            prompt_tokenizer=_T5,
            negative_prompt="true_cfg",
            single_file=False,
            precise_vae=False,
            denoiser="transformer",
            sequence_length_from="tokenizer_2",
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
