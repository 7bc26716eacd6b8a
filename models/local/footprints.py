"""What a model's weights will take once loaded, before they are: the parameter counts their
.safetensors files declare (each file's header lists every tensor's shape), at the dtype they
will run in. Residency makes room for this much before a first load, so that a load never
crowds past the budget on its way in; once loaded the measured footprint takes over.

Headers only: a few kB per file, no tensor is read. Pickled (.bin, .ckpt) weights declare
nothing without unpickling, which untrusted files must never get: they give no estimate.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

# A header past this is not a real one (the largest checkpoints have a few MB of it).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def declared_parameters(path: Path) -> int | None:
    """The parameters of a single .safetensors file, or of a diffusers folder (every
    component's weights, the plain file where a variant such as fp16 sits beside it, as
    diffusers loads by default); None where no .safetensors header says."""
    files = [path] if path.is_file() else _folder_weights(path)
    counts = [_file_parameters(file) for file in files]
    known = [count for count in counts if count is not None]
    return sum(known) if known else None


def _folder_weights(folder: Path) -> list[Path]:
    chosen = []
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        weights = sorted(component.glob("*.safetensors"))
        plain = [f for f in weights if _variant(f) is None]
        # Only variants (model.fp16.safetensors, and its shards): one of them.
        chosen += plain or [f for f in weights if _variant(f) == _variant(weights[0])]
    return chosen


def _variant(file: Path) -> str | None:
    """ "fp16" of model.fp16.safetensors (and of its shards, model.fp16-00001-of-00002...)."""
    parts = file.name.split(".")
    return parts[1].split("-")[0] if len(parts) > 2 else None


def _file_parameters(file: Path) -> int | None:
    try:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if not 0 < size <= _MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    total = 0
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        shape = entry.get("shape")
        if isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape):
            total += math.prod(shape)
    return total
