"""The batch manifest (`manifest.jsonl`, one line per row outcome) and the append-only JSON-lines
mechanics every batch sidecar shares: a line goes out in one write and is fsynced, and a torn
last line (the process was killed mid-write) is detected on read and cut off on resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"

RowStatus = Literal["done", "failed", "skipped_budget"]
# Outcomes a resumed run does not repeat (a row skipped for budget may be tried again).
FINISHED: frozenset[str] = frozenset({"done", "failed"})


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest line. `images` are paths relative to the batch folder; `sha256`, `quality`
    and `near_duplicate_of` run parallel to them (`near_duplicate_of[i]` is the earlier image
    of this batch that image i nearly repeats, or None)."""

    row: int
    line: int
    status: RowStatus
    model: str | None = None
    provider: str | None = None
    cached: bool = False
    images: tuple[str, ...] = ()
    # The digests the service computed; manifests written before they were recorded lack them.
    sha256: tuple[str, ...] = ()
    seeds: tuple[int | None, ...] = ()
    cost_usd: float = 0.0
    gpu_seconds: float = 0.0
    saved_usd: float = 0.0
    quality: tuple[Mapping[str, Any], ...] = ()
    near_duplicate_of: tuple[str | None, ...] = ()
    # The resolved parameters that decide price and speed: width, height, n, steps, ...
    params: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    error: str | None = None
    param: str | None = None
    # With a budget: what the row reserved before it ran (skipped_budget: what it needed).
    reserved_usd: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("images", "sha256", "seeds", "quality", "near_duplicate_of"):
            data[name] = list(data[name])
        data["params"] = dict(self.params)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ManifestEntry:
        status = str(data["status"])
        if status not in ("done", "failed", "skipped_budget"):
            raise ValueError(f"unknown status {status!r}")
        return cls(
            row=int(data["row"]),
            line=int(data["line"]),
            status=cast(RowStatus, status),
            model=data.get("model"),
            provider=data.get("provider"),
            cached=bool(data.get("cached", False)),
            images=tuple(str(p) for p in data.get("images", ())),
            sha256=tuple(str(d) for d in data.get("sha256", ())),
            seeds=tuple(data.get("seeds", ())),
            cost_usd=float(data.get("cost_usd", 0.0)),
            gpu_seconds=float(data.get("gpu_seconds", 0.0)),
            saved_usd=float(data.get("saved_usd", 0.0)),
            quality=tuple(dict(q) for q in data.get("quality", ())),
            near_duplicate_of=tuple(data.get("near_duplicate_of", ())),
            params=dict(data.get("params") or {}),
            request_id=data.get("request_id"),
            error=data.get("error"),
            param=data.get("param"),
            reserved_usd=data.get("reserved_usd"),
        )


def read_manifest(path: Path) -> dict[int, ManifestEntry]:
    """The outcome of every recorded row (the last complete line for a row wins: a row skipped
    for budget may be tried again by a resumed run). Never modifies the file."""
    return {e.row: e for e in read_entries(path, repair=False)}


def finished_rows(path: Path) -> set[int]:
    """Rows the manifest at `path` records as done or failed (none if there is no file)."""
    return {row for row, e in read_manifest(path).items() if e.finished}


def read_entries(path: Path, *, repair: bool) -> list[ManifestEntry]:
    """Every complete, well-formed line in file order (see `read_lines` for `repair`)."""
    entries = []
    for obj in read_lines(path, repair=repair):
        try:
            entries.append(ManifestEntry.from_json(obj))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s: ignoring a malformed manifest line (%s)", path, exc)
    return entries


def read_lines(path: Path, *, repair: bool) -> list[dict[str, Any]]:
    """JSON objects of the lines that end in a newline. A torn last line (the process was
    killed mid-write) is ignored, and with `repair` cut off so the next append starts clean."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: ignoring a torn last line (%d bytes)", path, len(data) - end)
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
    objects: list[dict[str, Any]] = []
    for number, raw in enumerate(data[:end].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            log.warning("%s: line %d is damaged; ignoring it", path, number)
            continue
        if isinstance(obj, dict):
            objects.append(obj)
    return objects


def json_line(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def append(fd: int, data: bytes) -> None:
    """Whole lines in one write (looping only on a short write), then fsync."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("short write to a batch file")
        view = view[written:]
    os.fsync(fd)
