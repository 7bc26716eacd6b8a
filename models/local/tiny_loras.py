"""Builds tiny LoRA adapters for the built-in tiny models (tests and the bench): seeded random
low-rank weights shaped for the tiny-sdxl and tiny-flux layers, in the diffusers/PEFT and the
kohya formats, plus two misfits for the refusal paths. The same bytes on every build.

- tiny-sdxl-a, tiny-sdxl-b, tiny-sdxl-c: diffusers/PEFT, the U-Net's attention layers.
- tiny-sdxl-kohya: kohya/A1111 names (lora_unet_, lora_te1_, lora_te2_), U-Net and both text
  encoders: what diffusers converts on load.
- tiny-flux-a, tiny-flux-b: diffusers/PEFT, the transformer's attention layers.
- sd15-kohya: an SD1.5 LoRA's names and widths (768-wide cross-attention, one text encoder):
  detected as sd15 from its header and refused on the SDXL and Flux models.
- sdxl-base-shaped: a LoRA for the full-size SDXL base (2048-wide cross-attention): detected as
  sdxl, so it passes the family check and fails where diffusers loads it on tiny-sdxl.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from models.local import tiny
from models.local.runtime import quiet_libraries

RANK = 4
SDXL_LORAS = ("tiny-sdxl-a", "tiny-sdxl-b", "tiny-sdxl-c")
FLUX_LORAS = ("tiny-flux-a", "tiny-flux-b")
KOHYA_SDXL_LORA = "tiny-sdxl-kohya"
SD15_LORA = "sd15-kohya"
SDXL_BASE_LORA = "sdxl-base-shaped"
TINY_LORAS = (*SDXL_LORAS, KOHYA_SDXL_LORA, *FLUX_LORAS, SD15_LORA, SDXL_BASE_LORA)

_UNET_ATTENTION = tuple(
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
)
_FLUX_ATTENTION = tuple(f".attn.{proj}" for proj in ("to_q", "to_k", "to_v", "to_out.0"))
_CLIP_ATTENTION = tuple(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj"))

# (module path, input width, output width) of one adapted layer.
Layer = tuple[str, int, int]
# A layer's module path -> its (down, up, alpha or None) tensor names in a file's format.
Naming = Callable[[str], tuple[str, str, str | None]]


def build_tiny_loras(lora_dir: Path) -> dict[str, Path]:
    """Write every tiny LoRA into `lora_dir`; name -> file."""
    quiet_libraries()
    from safetensors.torch import save_file

    sdxl = tiny.build_tiny_sdxl()
    flux = tiny.build_tiny_flux()
    unet = _linear_layers(sdxl.unet, _UNET_ATTENTION)
    te1 = _linear_layers(sdxl.text_encoder, _CLIP_ATTENTION)
    te2 = _linear_layers(sdxl.text_encoder_2, _CLIP_ATTENTION)
    transformer = _linear_layers(flux.transformer, _FLUX_ATTENTION)
    tensors: dict[str, dict[str, Any]] = {}
    for seed, name in enumerate(SDXL_LORAS, start=1):
        tensors[name] = _low_rank(unet, _peft("unet"), seed=seed, scale=0.5)
    tensors[KOHYA_SDXL_LORA] = {
        **_low_rank(unet, _kohya("lora_unet_"), seed=4, scale=0.5),
        **_low_rank(te1, _kohya("lora_te1_"), seed=5, scale=0.5),
        **_low_rank(te2, _kohya("lora_te2_"), seed=6, scale=0.5),
    }
    for seed, name in enumerate(FLUX_LORAS, start=7):
        tensors[name] = _low_rank(transformer, _peft("transformer"), seed=seed, scale=2.0)
    # The widths of the real models, on layer names each really has.
    block = "down_blocks.{}.attentions.0.transformer_blocks.0.attn2.{}"
    tensors[SD15_LORA] = {
        **_low_rank(
            [(block.format(0, p), 768, 320) for p in ("to_k", "to_v")],
            _kohya("lora_unet_"),
            seed=9,
            scale=0.5,
        ),
        **_low_rank(
            [("text_model.encoder.layers.0.self_attn.q_proj", 768, 768)],
            _kohya("lora_te_"),
            seed=10,
            scale=0.5,
        ),
    }
    tensors[SDXL_BASE_LORA] = _low_rank(
        [(block.format(1, p), 2048, 640) for p in ("to_k", "to_v")],
        _peft("unet"),
        seed=11,
        scale=0.5,
    )
    lora_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, state in tensors.items():
        path = lora_dir / f"{name}.safetensors"
        save_file(state, str(path), metadata={"imagegen_tiny_lora": name})
        written[name] = path
    return written


def _linear_layers(module: Any, suffixes: tuple[str, ...]) -> list[Layer]:
    import torch

    return [
        (name, int(m.in_features), int(m.out_features))
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and name.endswith(suffixes)
    ]


def _low_rank(
    layers: Iterable[Layer], naming: Naming, *, seed: int, scale: float
) -> dict[str, Any]:
    """A rank-RANK pair per layer. Unlike a LoRA before training (its up matrix zero), both
    matrices are random: the adapter must change the pixels."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for name, fan_in, fan_out in layers:
        down, up, alpha = naming(name)
        state[down] = torch.randn(RANK, fan_in, generator=generator) / fan_in**0.5
        state[up] = torch.randn(fan_out, RANK, generator=generator) * scale
        if alpha is not None:
            state[alpha] = torch.tensor(float(RANK))
    return state


def _peft(prefix: str) -> Naming:
    return lambda name: (f"{prefix}.{name}.lora_A.weight", f"{prefix}.{name}.lora_B.weight", None)


def _kohya(prefix: str) -> Naming:
    """kohya names a text encoder's layers from `text_model_`, whichever way transformers
    nests the module (CLIPTextModel has lost the level in transformers 5)."""

    def naming(name: str) -> tuple[str, str, str | None]:
        if prefix.startswith("lora_te"):
            name = "text_model." + name.removeprefix("text_model.")
        key = prefix + name.replace(".", "_")
        return f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"

    return naming
