"""Builds full-size SDXL and Flux pipelines with seeded random weights from the published
component configs in models/data/architectures: the `random:<arch>` model source.

They make noise, not pictures. They exist to measure the GPU path (memory, speed, residency and
eviction) at the real models' sizes without their weights: the same modules with the same
shapes as stabilityai/stable-diffusion-xl-base-1.0 and black-forest-labs/FLUX.1-dev, so the same
bytes to hold and move and the same FLOPs per step. They never download anything: the configs
are data files shipped here, and the tokenizers are models.local.tiny's byte-level ones at the
real limits (CLIP 77 tokens, T5 512; one token per character, so prompts must be short).

Every component is constructed directly on the target device in the target dtype: Flux's 12 B
parameters never pass through host RAM, nor exist in float32.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from models.base import ModelUnavailableError
from models.local import tiny

# The package's own data (installed with it: pyproject's package-data). Module-level so that a
# test can point it at a copy.
ARCHITECTURE_DIR = Path(__file__).resolve().parent.parent / "data" / "architectures"
# Bump when the builder changes what it makes from the same data file (the seeds, how weights
# are initialised): the revision changes with it, so old cache entries no longer match.
FULLSIZE_BUILD_VERSION = "1"
# Every component is initialised from this seed, as models.local.tiny does: the weights depend
# only on the architecture, the torch build and the device.
_SEED = 0

_TOKENIZERS: dict[str, Callable[[int], Any]] = {
    "CLIPTokenizer": tiny._clip_tokenizer,
    "T5TokenizerFast": tiny._t5_tokenizer,
}


def architectures() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in ARCHITECTURE_DIR.glob("*.json")))


def architecture_file(arch: str) -> Path:
    # Looked up among the files, never joined blindly: "random:../x" names no file elsewhere.
    if arch not in architectures():
        raise ModelUnavailableError(
            f"unknown random architecture '{arch}'; use random:<arch> with one of "
            f"{', '.join(architectures())} (the data files in models/data/architectures)"
        )
    return ARCHITECTURE_DIR / f"{arch}.json"


def revision(arch: str) -> str:
    """Names the weights: a changed config (or builder) makes another model."""
    digest = hashlib.sha256(FULLSIZE_BUILD_VERSION.encode())
    digest.update(architecture_file(arch).read_bytes())
    return f"random:{arch}:{digest.hexdigest()}"


def load_architecture(arch: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(architecture_file(arch).read_text(encoding="utf-8"))
    return data


def scheduler_config(arch: str) -> dict[str, object]:
    """The scheduler config as a model folder would ship it (part of the cache key)."""
    config: dict[str, object] = load_architecture(arch)["components"]["scheduler"]["config"]
    return dict(config)


def build_tokenizer(arch: str, name: str) -> Any:
    """Tokenizer component `name` ("tokenizer", "tokenizer_2"): the tiny byte-level one of
    its class, with the real model's limit."""
    spec = load_architecture(arch)["components"][name]
    return _TOKENIZERS[spec["class"]](int(spec["model_max_length"]))


def build_component(arch: str, name: str, *, device: str, dtype: Any) -> Any:
    """One component of the pipeline, its weights made on `device` in `dtype` ("meta" makes
    them without memory: shapes only)."""
    import diffusers
    import torch
    import transformers

    components = load_architecture(arch)["components"]
    spec = components[name]
    if spec["class"] in _TOKENIZERS:
        return build_tokenizer(arch, name)
    library = diffusers if spec["library"] == "diffusers" else transformers
    cls = getattr(library, spec["class"])
    config = dict(spec["config"])
    if issubclass(cls, diffusers.SchedulerMixin):
        return cls.from_config(config)
    # diffusers pairs text_encoder_N with tokenizer_N. The published ids are the real
    # vocabularies'; the encoder is given the tiny tokenizer's, so that it finds the tokens it
    # is really sent (CLIP's pooled output is read at the end-of-text token).
    tokenizer_name = name.replace("text_encoder", "tokenizer")
    if name.startswith("text_encoder") and tokenizer_name in components:
        tokenizer = build_tokenizer(arch, tokenizer_name)
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if field in config and getattr(tokenizer, field) is not None:
                config[field] = getattr(tokenizer, field)
    with torch.device(device), _default_dtype(torch, dtype):
        torch.manual_seed(_SEED)
        # A diffusers model is made from its config's fields, a transformers one from a config.
        model = cls.from_config(config) if library is diffusers else cls(cls.config_class(**config))
    # Constructed models start in training mode; from_pretrained's are in eval mode.
    return model.eval()


def build_pipeline(arch: str, *, device: str, dtype: Any) -> Any:
    """The architecture's diffusers pipeline, every component built on `device` in `dtype`.

    Running out of device memory raises a fresh torch OutOfMemoryError, without the original's
    traceback: its frames hold the half-built components, which would otherwise stay on the
    device while the caller evicts other models and tries again."""
    import diffusers
    import torch

    data = load_architecture(arch)
    components: dict[str, Any] = {}
    try:
        for name in data["components"]:
            components[name] = build_component(arch, name, device=device, dtype=dtype)
    except torch.cuda.OutOfMemoryError as exc:
        message = str(exc)
    else:
        return getattr(diffusers, data["pipeline"])(**components)
    components.clear()
    gc.collect()
    raise torch.cuda.OutOfMemoryError(message)


def published_parameters(arch: str) -> int:
    """The parameters of every component as the data file states them (published figures,
    which the tests hold the builds to): what a build will take, known before it runs."""
    components = load_architecture(arch)["components"].values()
    return sum(int(spec["parameters"]) for spec in components if "parameters" in spec)


def parameter_counts(arch: str) -> dict[str, int]:
    """Parameters per model component, counted on the meta device (no memory, no init): what
    the tests compare with the published figures."""
    import torch

    counts: dict[str, int] = {}
    for name, spec in load_architecture(arch)["components"].items():
        if "parameters" not in spec:
            continue  # a tokenizer or the scheduler: no weights
        model = build_component(arch, name, device="meta", dtype=torch.float32)
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts


@contextlib.contextmanager
def _default_dtype(torch: Any, dtype: Any) -> Iterator[None]:
    """Neither diffusers' nor transformers' constructors take a dtype: the default dtype makes
    the parameters in it directly (no float32 copy first), as transformers' own from_config
    does. It is process-wide for as long as a build takes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
