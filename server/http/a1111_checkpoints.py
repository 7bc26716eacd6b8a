"""A1111's view of the models: each available model listed as A1111 lists a checkpoint file
(title "<name> [<short hash>]", the short hash, the sha256), and the model that a checkpoint
string from a client names (a title, a name, a short hash or a sha256)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from server import errors
from server.http.state import AppState

# A1111's short hash: the first 10 hex digits of the sha256.
SHORT_HASH = 10
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Checkpoint:
    """One model as an A1111 checkpoint.

    The hashes are not A1111's (a hash of one checkpoint file): they are of what identifies
    the model's weights here, the revision in the cache key and the PNG metadata
    (models.local.sources). For a diffusers folder or a built-in model that is the sha256 over
    every file's name and sha256; for a single .safetensors file, that file's sha256 (there
    it is A1111's own). A hub repo's revision is its commit id: `hash` is its first 10 digits
    and `sha256` stays None, as it is not one. Hosted models, and weights not on disk, have
    neither."""

    name: str
    source: str
    # The catalogue model an alias row (dall-e-3 ...) stands for; None for the model itself.
    alias_of: str | None = None
    sha256: str | None = None
    hash: str | None = None
    # Where its weights are now (GET /v1/models' where, device, footprint_bytes and mode),
    # for local models; empty for hosted ones.
    placement: tuple[tuple[str, Any], ...] = ()

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    @classmethod
    def of(cls, row: dict[str, Any], revision: str | None) -> Checkpoint:
        kind, _, digest = (revision or "").partition(":")
        sha256 = digest if kind == "sha256" and len(digest) == 64 else None
        short = digest[:SHORT_HASH] if kind in ("sha256", "hub") and digest else None
        return cls(
            name=str(row["name"]),
            source=str(row.get("source") or ""),
            alias_of=row.get("alias_of"),
            sha256=sha256,
            hash=short,
            placement=tuple(
                (key, row[key])
                for key in ("where", "device", "footprint_bytes", "mode")
                if key in row
            ),
        )


def _available(state: AppState) -> list[dict[str, Any]]:
    return [row for row in state.service.models() if row.get("available")]


async def checkpoints(state: AppState, names: Iterable[str] | None = None) -> list[Checkpoint]:
    """The available models (those of `names` only, where given) with their hashes."""
    wanted = set(names) if names is not None else None
    service = state.service

    def listed() -> list[Checkpoint]:
        rows = [row for row in _available(state) if wanted is None or row["name"] in wanted]
        return [
            Checkpoint.of(row, service.model_revision(str(row.get("alias_of") or row["name"])))
            for row in rows
        ]

    # Off the loop: the first look at a model's weights on disk hashes their files.
    return await asyncio.to_thread(listed)


async def checkpoint(state: AppState, name: str) -> Checkpoint:
    """Model `name` as a checkpoint (without hashes where it is not available)."""
    found = await checkpoints(state, [name])
    return found[0] if found else Checkpoint(name=name, source="")


async def model_named(state: AppState, text: str) -> str:
    """The model an A1111 checkpoint string names: by title ("<name>" or "<name> [hash]"),
    model name or source, case-insensitively (webuiapi lowercases what it sends), else by
    short hash or sha256 (a "sha256:" prefix, as in the PNG metadata, is allowed)."""
    wanted = text.strip()
    if wanted.endswith("]") and " [" in wanted:
        wanted = wanted[: wanted.rindex(" [")]
    key = wanted.lower()
    for row in _available(state):
        if key in (str(row["name"]).lower(), str(row.get("source") or "").lower()):
            return str(row["name"])
    digest = key.removeprefix("sha256:")
    if len(digest) in (SHORT_HASH, 64) and _HEX.fullmatch(digest):
        # Only now are hashes worked out; a model itself before any alias of it.
        found = sorted(await checkpoints(state), key=lambda c: c.alias_of is not None)
        for candidate in found:
            if digest in (candidate.hash, candidate.sha256):
                return candidate.name
    raise errors.ModelNotFoundError(
        f"sd_model_checkpoint '{text}' names no model here; GET /sdapi/v1/sd-models lists the "
        "titles to use",
        param="sd_model_checkpoint",
    )
