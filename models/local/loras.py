"""The LoRA library: the `.safetensors` adapters in local.lora_dir, found by name (the file's
stem), each with the family it fits (read from the tensor names and shapes in the file's
header) and its sha256. Torch-free: listing reads headers only, never a tensor.

A name never leaves the folder, and pickle files (.pt, .ckpt, .bin) are refused: loading one
runs whatever code it carries.
"""

from __future__ import annotations

import builtins
import json
import logging
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.base import InvalidParamsError
from models.local import sources

log = logging.getLogger(__name__)

LoraFamily = Literal["sdxl", "flux", "sd15"]
LoraFormat = Literal["diffusers", "kohya"]

SUFFIX = ".safetensors"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# A safetensors header is JSON naming every tensor: a few MB for the largest LoRAs. A bigger
# length is a damaged or foreign file, and is not read into memory.
_MAX_HEADER_BYTES = 64 * 1024 * 1024
# Cross-attention width (the text embedding a U-Net attends to) per family.
_CROSS_ATTENTION_DIMS: Mapping[int, LoraFamily] = {768: "sd15", 2048: "sdxl"}
# How many names an "unknown LoRA" error lists.
_NAMES_SHOWN = 20


@dataclass(frozen=True)
class LoraFile:
    name: str  # the file's stem: what requests name
    path: Path
    sha256: str
    family: LoraFamily | None  # None: the header does not say (the load decides)
    format: LoraFormat
    size_bytes: int

    def check_fits(self, model: str, kind: str) -> None:
        """Raise where this LoRA is for another family than `kind` (model `model`'s)."""
        if self.family is not None and self.family != kind:
            raise InvalidParamsError(
                f"lora '{self.name}' ({self.path.name}) is a {self.family} LoRA; model "
                f"'{model}' is {kind}. Use a {kind} LoRA or a {self.family} model",
                param="loras",
            )


class LoraLibrary:
    """The adapters in `root`. A file's description (header and sha256) is kept per (path,
    size, mtime): listing and every request look it up instead of hashing the file again;
    `memo_dir` (the data directory's digest memo) keeps the hashes across restarts."""

    def __init__(self, root: Path, *, memo_dir: Path | None = None) -> None:
        self.root = root
        self.memo_dir = memo_dir
        self._described: dict[tuple[str, int, int], LoraFile] = {}
        # find() runs on the service's threads and on the device worker's.
        self._lock = threading.Lock()

    def list(self) -> list[LoraFile]:
        """Every adapter find() would give, by name; the rest (a damaged file, a link out of
        the folder) are logged with what is wrong and left out."""
        found = []
        for name in self.names():
            try:
                found.append(self.find(name))
            except InvalidParamsError as exc:
                log.warning("LoRA library: %s", exc.message)
        return found

    def names(self) -> builtins.list[str]:
        return [path.name.removesuffix(SUFFIX) for path in self._files()]

    def find(self, name: str) -> LoraFile:
        """The adapter `name`, or InvalidParamsError(param="loras") saying why not and what to
        do: a name outside the folder, a pickle file, a name not in the library."""
        stem = name.removesuffix(SUFFIX)
        if not stem or "/" in stem or "\\" in stem or "\0" in stem or stem in (".", ".."):
            raise InvalidParamsError(
                f"lora name '{name}' must be a file name in the LoRA library (local.lora_dir), "
                "without '/', '\\' or '..'",
                param="loras",
            )
        path = self.root / (stem + SUFFIX)
        pickled = stem if stem.endswith(_PICKLE_SUFFIXES) else None
        if pickled is None and not path.is_file():
            pickled = self._pickled(stem)
        if pickled is not None:
            raise InvalidParamsError(
                f"lora '{stem}' ({pickled}) is a pickle file, which imagegen never loads: "
                "loading a pickle runs code. Convert it to .safetensors in local.lora_dir",
                param="loras",
            )
        if not path.is_file():
            raise InvalidParamsError(self._unknown(stem), param="loras")
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise InvalidParamsError(
                f"lora '{stem}' ({path.name}) is a link to a file outside the LoRA library "
                "(local.lora_dir); copy the file into the folder instead",
                param="loras",
            )
        return self._describe(path)

    # -- the files ---------------------------------------------------------------------

    def _files(self) -> builtins.list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(
            p for p in self.root.iterdir() if p.suffix == SUFFIX and p.is_file() and p.stem
        )

    def _pickled(self, stem: str) -> str | None:
        for suffix in _PICKLE_SUFFIXES:
            if (self.root / (stem + suffix)).is_file():
                return stem + suffix
        return None

    def _unknown(self, stem: str) -> str:
        names = self.names()
        if not names:
            return (
                f"lora '{stem}' is not in the LoRA library, which is empty: put "
                f"{stem}{SUFFIX} in local.lora_dir"
            )
        shown = ", ".join(names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")
        return (
            f"lora '{stem}' is not in the LoRA library (local.lora_dir); it has: {shown} "
            "(`imagegen loras` lists them)"
        )

    def _describe(self, path: Path) -> LoraFile:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._described.get(key)
        if known is not None:
            return known
        name = path.name.removesuffix(SUFFIX)
        try:
            shapes = read_tensor_shapes(path)
        except ValueError as exc:
            raise InvalidParamsError(
                f"lora '{name}' ({path.name}) is not a readable safetensors file ({exc}); "
                "replace it with a .safetensors LoRA",
                param="loras",
            ) from None
        described = LoraFile(
            name=name,
            path=path,
            sha256=sources.file_sha256(path, self.memo_dir),
            family=detect_family(shapes),
            format=detect_format(shapes),
            size_bytes=stat.st_size,
        )
        with self._lock:
            self._described[key] = described
        return described


# -- the header ---------------------------------------------------------------------------


def read_tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (8-byte little-endian length, then that
    much JSON); ValueError saying what is wrong where the file is not one."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError("the header length is past the end of the file")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    shapes: dict[str, list[int]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list):
            raise ValueError(f"tensor '{key}' has no shape")
        shapes[key] = [int(d) for d in shape]
    if not shapes:
        raise ValueError("it holds no tensors")
    return shapes


def detect_format(shapes: Mapping[str, list[int]]) -> LoraFormat:
    """kohya/A1111 files name layers `lora_unet_...` / `lora_te1_...` with lora_down/lora_up
    pairs; diffusers/PEFT files name module paths (`unet.`, `transformer.`) with lora_A/B."""
    kohya = any(k.startswith("lora_") or ".lora_down." in k for k in shapes)
    return "kohya" if kohya else "diffusers"


def detect_family(shapes: Mapping[str, list[int]]) -> LoraFamily | None:
    """The family a LoRA was trained for, from its tensor names and shapes, most telling
    evidence first: Flux's own block names; the U-Net's cross-attention width (SD1.5 and SDXL
    share the naming, not the width); the text encoders (SDXL has two, SD1.5 one); and last
    the U-Net prefix alone, which in practice means SDXL."""
    keys = list(shapes)

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    def contains(*needles: str) -> bool:
        return any(n in k for k in keys for n in needles)

    if contains("double_blocks", "single_blocks", "single_transformer_blocks") or starts(
        "lora_transformer_", "transformer."
    ):
        return "flux"
    widths = {
        shape[-1]
        for key, shape in shapes.items()
        if "attn2" in key and ("to_k" in key or "to_v" in key) and _is_down(key) and shape
    }
    for width, family in _CROSS_ATTENTION_DIMS.items():
        if width in widths:
            return family
    if starts("lora_te1_", "lora_te2_", "text_encoder_2."):
        return "sdxl"
    if starts("lora_te_"):
        return "sd15"
    if starts("lora_unet_", "unet."):
        return "sdxl"
    return None


def _is_down(key: str) -> bool:
    """The first (input-side) matrix of a LoRA pair, whose last dimension is the layer's
    input width: kohya's lora_down, PEFT's lora_A, old diffusers' lora.down."""
    return any(part in key for part in (".lora_down.", ".lora_A.", "lora.down.", "_lora.down."))
