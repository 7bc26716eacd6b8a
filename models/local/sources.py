"""Where local weights come from: a hub repo id, a local diffusers folder, a single-file
`.safetensors` checkpoint, a built-in tiny model, or a full-size architecture with random
weights (`random:<arch>`, models.local.fullsize), and the revision that identifies them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.base import ModelUnavailableError
from models.local import fullsize, tiny

log = logging.getLogger(__name__)

SourceKind = Literal["builtin", "random", "folder", "single_file", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedSource:
    kind: SourceKind
    # A folder or file on disk; for "hub" the snapshot folder in the HF cache; for "random"
    # the architecture's data file (there are no weights on disk).
    path: Path
    revision: str


def classify(source: str) -> SourceKind:
    if source.startswith("builtin:"):
        return "builtin"
    if source.startswith("random:"):
        return "random"
    path = Path(source).expanduser()
    if source.endswith((".safetensors", ".ckpt")):
        return "single_file"
    if path.is_absolute() or source.startswith((".", "~")) or path.exists():
        return "folder"
    if _HUB_ID.match(source):
        return "hub"
    return "folder"


def _hash_files(files: list[Path], root: Path, memo_dir: Path | None) -> str:
    """sha256 over (relative name, content) of every file. Multi-GB weights are hashed once:
    the digest is remembered under (path, size, mtime) in `memo_dir`."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file_sha256(file, memo_dir).encode())
    return digest.hexdigest()


def digest_memo_dir(data_dir: Path) -> Path:
    """Where file digests are remembered (weights, LoRA files) under the data directory."""
    return data_dir / "revisions"


def file_sha256(file: Path, memo_dir: Path | None) -> str:
    """The file's sha256, remembered under (path, size, mtime) in `memo_dir`."""
    stat = file.stat()
    memo: Path | None = None
    if memo_dir is not None:
        tag = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        memo = memo_dir / (hashlib.sha256(tag.encode()).hexdigest() + ".sha256")
        if memo.is_file():
            return memo.read_text().strip()
    h = hashlib.sha256()
    with file.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    value = h.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(value)
        os.replace(tmp, memo)
    return value


def folder_revision(path: Path, memo_dir: Path | None = None) -> str:
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return "sha256:" + _hash_files(files, path, memo_dir)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The cached snapshot of a hub repo, never downloading: downloads are an explicit step
    (`huggingface-cli download`) so that no default code path reaches the network."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with diffusers
        raise ModelUnavailableError(f"huggingface_hub is not installed: {exc}") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelUnavailableError(
            f"model '{repo_id}' is not in the local Hugging Face cache (HF_HOME); download it "
            f"first with `imagegen pull {repo_id}` (or `huggingface-cli download {repo_id}`) on a "
            "machine with internet access, or point the model's source at a local folder or "
            ".safetensors file"
        ) from None
    except Exception as exc:  # the hub client raises several unrelated types here
        log.exception("hub model %s cannot be resolved from the local cache", repo_id)
        raise ModelUnavailableError(
            f"model '{repo_id}' cannot be resolved from the local Hugging Face cache "
            f"({type(exc).__name__}); the server log has the details"
        ) from None


def download_hub_model(repo_id: str, revision: str | None = None) -> Path:
    """Download a hub repo into the Hugging Face cache: the one explicit step that reaches the
    network (`imagegen pull`). Offline or unreachable hubs fail at once with what to do."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with diffusers
        raise ModelUnavailableError(f"huggingface_hub is not installed: {exc}") from None
    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailableError(
            f"cannot download '{repo_id}': HF_HUB_OFFLINE is set. Unset it on a machine with "
            "internet access, or copy the weights here and use a local folder"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, etag_timeout=15))
    except Exception as exc:  # connection, auth (gated repos) and not-found errors alike
        raise ModelUnavailableError(
            f"cannot download '{repo_id}' from the Hugging Face hub: {type(exc).__name__}: "
            f"{exc}. Check the network, the repo id, and for gated models "
            "`huggingface-cli login` after accepting the license"
        ) from None


def resolve(source: str, *, data_dir: Path, revision: str | None = None) -> ResolvedSource:
    """Find the weights on disk and compute their revision. Raises ModelUnavailableError with
    what to do when they are not there. Never downloads."""
    kind = classify(source)
    memo_dir = digest_memo_dir(data_dir)
    if kind == "builtin":
        name = source.removeprefix("builtin:")
        if name not in tiny.TINY_MODELS:
            raise ModelUnavailableError(
                f"unknown built-in model '{name}'; built-ins are {', '.join(tiny.TINY_MODELS)}"
            )
        path = tiny.ensure_tiny_model(data_dir, name)
        return ResolvedSource("builtin", path, folder_revision(path, memo_dir))
    if kind == "random":
        arch = source.removeprefix("random:")
        return ResolvedSource("random", fullsize.architecture_file(arch), fullsize.revision(arch))
    if kind == "hub":
        path = _hub_snapshot(source, revision)
        # The snapshot folder is named after the commit: the hub's own revision id.
        return ResolvedSource("hub", path, "hub:" + path.name)
    path = Path(source).expanduser()
    if kind == "single_file":
        if not path.is_file():
            raise ModelUnavailableError(
                f"checkpoint file '{path}' does not exist; check the model's source path"
            )
        return ResolvedSource("single_file", path, "sha256:" + file_sha256(path, memo_dir))
    if not (path / "model_index.json").is_file():
        raise ModelUnavailableError(
            f"'{path}' is not a diffusers model folder (no model_index.json); use a folder "
            "written by save_pretrained, a .safetensors file, or a hub repo id"
        )
    return ResolvedSource("folder", path, folder_revision(path, memo_dir))


@dataclass(frozen=True)
class Availability:
    """Whether a model's weights can be loaded here without a download (the model listing)."""

    available: bool
    on_disk: bool
    builtin: bool
    reason: str | None = None  # what to do, where not available


def availability(source: str, *, data_dir: Path) -> Availability:
    """Cheap: hashes nothing and builds nothing."""
    kind = classify(source)
    if kind == "builtin":
        folder = tiny.tiny_model_dir(data_dir, source.removeprefix("builtin:"))
        # Built on first use, offline: available before it is on disk.
        return Availability(available=True, on_disk=tiny.is_built(folder), builtin=True)
    if kind == "random":
        try:
            fullsize.architecture_file(source.removeprefix("random:"))
        except ModelUnavailableError as exc:
            return Availability(available=False, on_disk=False, builtin=True, reason=exc.message)
        # Nothing to fetch or build before a load, which makes the weights: as good as on disk.
        return Availability(available=True, on_disk=True, builtin=True)
    try:
        _check_on_disk(kind, source)
    except ModelUnavailableError as exc:
        return Availability(available=False, on_disk=False, builtin=False, reason=exc.message)
    return Availability(available=True, on_disk=True, builtin=False)


def _check_on_disk(kind: SourceKind, source: str) -> None:
    if kind == "hub":
        _hub_snapshot(source, None)
        return
    path = Path(source).expanduser()
    if kind == "single_file" and not path.is_file():
        raise ModelUnavailableError(f"checkpoint file '{path}' does not exist")
    if kind == "folder" and not (path / "model_index.json").is_file():
        raise ModelUnavailableError(f"'{path}' is not a diffusers model folder")


def scheduler_config(resolved: ResolvedSource) -> dict[str, object]:
    """The scheduler config shipped with the weights (part of the cache key)."""
    if resolved.kind == "single_file":
        return {}
    if resolved.kind == "random":
        return fullsize.scheduler_config(resolved.path.stem)
    file = resolved.path / "scheduler" / "scheduler_config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if not k.startswith("_")}
