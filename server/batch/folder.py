"""The batch output folder: `batch.json` (batch id = the ledger tag, input fingerprint), the
append-only `manifest.jsonl`, the `seeds.jsonl` sidecar, and the images; opening a new batch or
resuming one, and refusing a folder that holds another run."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from server.batch.errors import BatchError
from server.batch.manifest import (
    MANIFEST_NAME,
    ManifestEntry,
    append,
    json_line,
    read_entries,
    read_lines,
)
from server.store.files import atomic_write

SEEDS_NAME = "seeds.jsonl"
STATE_NAME = "batch.json"
BATCH_ID_PREFIX = "batch_"
_STATE_SCHEMA = 1


def new_batch_id() -> str:
    return BATCH_ID_PREFIX + uuid.uuid4().hex[:20]


class BatchFolder:
    """An open batch folder. Appends are serialised with close(): a cancelled row's task stops
    waiting for its append, but the thread making it goes on, and the descriptor (whose number
    the next open file would reuse) must not close under it."""

    def __init__(
        self,
        path: Path,
        *,
        batch_id: str,
        fingerprint: str,
        entries: Sequence[ManifestEntry],
        seeds: Mapping[int, int],
    ) -> None:
        self.path = path
        self.batch_id = batch_id
        self.fingerprint = fingerprint
        # Manifest order (oldest first); `latest` is the outcome per row.
        self.entries: list[ManifestEntry] = list(entries)
        self.latest: dict[int, ManifestEntry] = {e.row: e for e in self.entries}
        self.seeds: dict[int, int] = dict(seeds)
        self._guard = threading.Lock()
        self._manifest_fd: int | None = None
        self._seeds_fd: int | None = None

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        fingerprint: str,
        resume: bool,
        source: str = "",
        batch_id: str | None = None,
    ) -> BatchFolder:
        """Start a batch in `path` (with `batch_id`, or a new one), or with `resume` continue
        the one it holds. Without `resume`, a folder whose manifest has lines is refused."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BatchError(
                "{out} '{path}' cannot be created: {reason}",
                param="out",
                path=path,
                reason=exc.strerror,
            ) from None
        manifest = path / MANIFEST_NAME
        has_lines = manifest.is_file() and manifest.stat().st_size > 0
        if has_lines and not resume:
            raise BatchError(
                "{out} '{path}' already holds a batch manifest ({manifest}); pass {resume} to "
                "continue that batch, or choose another {out}",
                param="out",
                path=path,
                manifest=MANIFEST_NAME,
            )
        _remove_temp_files(path)
        state_path = path / STATE_NAME
        state = _read_state(state_path, strict=resume) if state_path.is_file() else None
        # A run that recorded nothing yet is continued too when its requests are the same:
        # its seeds and batch id are kept, so nothing it already generated is billed again.
        if state is not None and (resume or state.get("fingerprint") == fingerprint):
            if state.get("fingerprint") != fingerprint:
                raise BatchError(
                    "{resume}: the requests differ from those of the batch in '{path}' "
                    "({batch_id}, started {created}): {file}, {model} or {preset} changed. "
                    "Resume with the same ones, or choose another {out}",
                    param="resume",
                    path=path,
                    batch_id=state.get("batch_id"),
                    created=state.get("created"),
                )
            folder = cls(
                path,
                batch_id=str(state["batch_id"]),
                fingerprint=fingerprint,
                entries=read_entries(manifest, repair=True),
                seeds=_read_seeds(path / SEEDS_NAME, repair=True),
            )
        else:
            if has_lines:
                raise BatchError(
                    "{resume}: '{path}' has a manifest but no {state}, so it cannot be "
                    "resumed; choose another {out}",
                    param="resume",
                    path=path,
                    state=STATE_NAME,
                )
            batch_id = batch_id or new_batch_id()
            _write_state(state_path, batch_id, fingerprint, source)
            for name in (MANIFEST_NAME, SEEDS_NAME):
                (path / name).unlink(missing_ok=True)
            folder = cls(path, batch_id=batch_id, fingerprint=fingerprint, entries=[], seeds={})
        folder._open_files()
        return folder

    def _open_files(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self._manifest_fd = os.open(self.path / MANIFEST_NAME, flags, 0o644)
        self._seeds_fd = os.open(self.path / SEEDS_NAME, flags, 0o644)
        _fsync_dir(self.path)

    def finished_rows(self) -> set[int]:
        return {row for row, e in self.latest.items() if e.finished}

    def append(self, entry: ManifestEntry) -> None:
        with self._guard:
            if self._manifest_fd is None:
                raise RuntimeError("the batch folder is closed")
            append(self._manifest_fd, json_line(entry.to_json()))
            self.entries.append(entry)
            self.latest[entry.row] = entry

    def record_seeds(self, seeds: Mapping[int, int]) -> None:
        """Persist chosen seeds (all in one write) before any of their rows runs."""
        if not seeds:
            return
        with self._guard:
            if self._seeds_fd is None:
                raise RuntimeError("the batch folder is closed")
            data = b"".join(json_line({"row": row, "seed": seed}) for row, seed in seeds.items())
            append(self._seeds_fd, data)
            self.seeds.update(seeds)

    def close(self) -> None:
        """Close the files, after the append in progress (if any) has finished."""
        with self._guard:
            for fd in (self._manifest_fd, self._seeds_fd):
                if fd is not None:
                    os.close(fd)
            self._manifest_fd = self._seeds_fd = None

    def __enter__(self) -> BatchFolder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _write_state(path: Path, batch_id: str, fingerprint: str, source: str) -> None:
    state = {
        "schema": _STATE_SCHEMA,
        "batch_id": batch_id,
        "fingerprint": fingerprint,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": source,
    }
    atomic_write(path, json.dumps(state, indent=2).encode("utf-8"))


def _read_state(path: Path, *, strict: bool) -> dict[str, Any] | None:
    """The folder's batch.json; unreadable is an error when resuming, else None (replaced)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if not strict:
            return None
        raise BatchError(
            "{resume}: cannot read '{path}': {reason}", param="resume", path=path, reason=exc
        ) from None
    if not isinstance(state, dict) or "batch_id" not in state:
        if not strict:
            return None
        raise BatchError("{resume}: '{path}' is not a batch state file", param="resume", path=path)
    return state


def _read_seeds(path: Path, *, repair: bool) -> dict[int, int]:
    seeds: dict[int, int] = {}
    for obj in read_lines(path, repair=repair):
        row, seed = obj.get("row"), obj.get("seed")
        if isinstance(row, int) and isinstance(seed, int):
            seeds[row] = seed
    return seeds


def _remove_temp_files(path: Path) -> None:
    """Half-written images of a killed run (atomic_write's temp files) are never referenced."""
    for item in path.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            item.unlink()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem lets a directory be fsynced
    finally:
        os.close(fd)
