"""Builds the built-in tiny pipelines (`tiny-sdxl`, `tiny-flux` and their inpainting and Kontext
variants): real diffusers pipelines with tiny, seeded random weights and tokenizers made
offline.

They make noise, not pictures. They exist so that every code path (loading, scheduling, batching,
caching, serving) runs for real on a CPU without a download. Each is written once into the data
directory with `save_pretrained` and from then on loaded like any local model folder.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.local.runtime import quiet_libraries

# Bump when the builder changes what it writes: a stale folder is rebuilt, and the revision
# (a hash of the files) changes so old cache entries no longer match.
TINY_BUILD_VERSION = "1"
TINY_MODELS = ("tiny-sdxl", "tiny-sdxl-inpaint", "tiny-flux", "tiny-flux-kontext", "tiny-flux-fill")
# Character-level tokenizers make one token per character; a longer context keeps ordinary
# prompts inside the limit (the real CLIP limit is 77 tokens).
TINY_CLIP_MAX_LENGTH = 256
TINY_T5_MAX_LENGTH = 256
_MARKER = "imagegen-tiny.json"
# A build folder older than this is a killed build's. A live build writes its folder within
# seconds of making it (the pipeline is made in memory first), so another process's build in
# progress, sharing the data directory, is never this old: an age needs no lock or pid, and
# pids say nothing across containers that share a volume.
STALE_BUILD_S = 10 * 60


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable character for each byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _clip_tokenizer(max_length: int) -> Any:
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = max_length
    return tok


def _t5_tokenizer(max_length: int) -> Any:
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(ord("!"), ord("~") + 1)]
    pieces += [("▁" + chr(c), -2.5) for c in range(ord("a"), ord("z") + 1)]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.model_max_length = max_length
    return tok


def _clip_text_config(max_length: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=600,
        max_position_embeddings=max_length,
        hidden_act="gelu",
        projection_dim=32,
    )


def build_tiny_sdxl(pipeline: str = "StableDiffusionXLPipeline", in_channels: int = 4) -> Any:
    """`in_channels` 9 makes the dedicated inpainting UNet (latents, mask, masked image)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled text dims
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config(TINY_CLIP_MAX_LENGTH))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(TINY_CLIP_MAX_LENGTH))
    tokenizer = _clip_tokenizer(TINY_CLIP_MAX_LENGTH)
    return getattr(diffusers, pipeline)(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=_clip_tokenizer(TINY_CLIP_MAX_LENGTH),
        unet=unet,
        scheduler=scheduler,
    )


def build_tiny_flux(pipeline: str = "FluxPipeline", in_channels: int = 4) -> Any:
    """Kontext is the same transformer driven by another pipeline; Fill's takes the packed
    masked-image latents and mask beside the latents (12 channels here: 4 each)."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        # None (the default: as many as in) keeps tiny-flux's config as it always was.
        out_channels=4 if in_channels != 4 else None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # like flux-dev: guidance_scale changes the pixels
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_text_config(TINY_CLIP_MAX_LENGTH))
    torch.manual_seed(0)
    t5_config = T5Config(
        vocab_size=200,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    text_encoder_2 = T5EncoderModel(t5_config)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    return getattr(diffusers, pipeline)(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(TINY_CLIP_MAX_LENGTH),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_t5_tokenizer(TINY_T5_MAX_LENGTH),
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[[], Any]] = {
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-sdxl-inpaint": lambda: build_tiny_sdxl("StableDiffusionXLInpaintPipeline", 9),
    "tiny-flux": build_tiny_flux,
    "tiny-flux-kontext": lambda: build_tiny_flux("FluxKontextPipeline"),
    "tiny-flux-fill": lambda: build_tiny_flux("FluxFillPipeline", 12),
}


def tiny_model_dir(data_dir: Path, name: str) -> Path:
    return data_dir / "models" / name


def is_built(path: Path) -> bool:
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text())["version"] == TINY_BUILD_VERSION)
    except (OSError, ValueError, KeyError):
        return False


def _build_prefixes() -> tuple[str, ...]:
    return tuple(f".{name}-" for name in TINY_MODELS)


def remove_stale_builds(models_dir: Path) -> list[Path]:
    """Delete the temporary folders that killed builds left in `models_dir` (those older than
    STALE_BUILD_S by mtime); returns what was removed."""
    try:
        entries = list(models_dir.iterdir())
    except OSError:
        return []
    removed = []
    cutoff = time.time() - STALE_BUILD_S
    for path in entries:
        if not path.name.startswith(_build_prefixes()):
            continue
        try:
            info = path.lstat()
        except OSError:
            continue  # removed meanwhile: another process cleaned it, or its build finished
        if stat.S_ISDIR(info.st_mode) and info.st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def ensure_tiny_model(data_dir: Path, name: str) -> Path:
    """Build `name` into the data directory unless an up-to-date copy is there; return its
    folder. Written to a temporary sibling and renamed, so a killed build leaves nothing that
    looks finished; what a killed build left is removed here once it is stale."""
    if name not in _BUILDERS:
        raise KeyError(name)
    target = tiny_model_dir(data_dir, name)
    # Here and not only before a build: a folder left by a killed build stays after another
    # process finished the model, and every process that uses a tiny model passes here once.
    remove_stale_builds(target.parent)
    if is_built(target):
        return target
    quiet_libraries()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Made before the folder, so the folder exists only while files are being written.
    pipe = _BUILDERS[name]()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / _MARKER).write_text(json.dumps({"name": name, "version": TINY_BUILD_VERSION}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
