"""Batch runs: a file of requests through the one ImageService path, with a crash-safe
append-only manifest, resume, a hard USD cap, near-duplicate flags and a dry-run cost projection.

FastAPI-free: `imagegen batch` drives it today and an HTTP /v1/batches route can reuse it as is
(`rows_from_objects` -> `BatchFolder.open` -> `run_batch`, or `plan_batch` for a dry run).

Crash safety, in the order things happen to one row:
1. seeds: every row without a seed gets one, recorded in `seeds.jsonl` (one write + fsync)
   before anything runs, so a row re-run after a kill asks for the same pixels: a cache hit;
2. the service generates (cache store and ledger row happen inside it);
3. the images are written atomically into the folder;
4. one `manifest.jsonl` line is appended with a single os.write + fsync.
A SIGKILL anywhere leaves at worst a torn last line, which the next open cuts off; a row whose
line is complete is never run again, and a row without one is run again (from the cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import datetime as dt
import difflib
import hashlib
import io
import json
import logging
import math
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast

from models.base import GenerationParams, OutputFormat
from server import errors
from server.cache import atomic_write, canonical_json
from server.quality import hamming
from server.service import (
    MAX_N,
    MAX_SEED,
    GenerationResult,
    ImageRequest,
    ImageService,
    PreparedRequest,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
SEEDS_NAME = "seeds.jsonl"
STATE_NAME = "batch.json"
_STATE_SCHEMA = 1

RowStatus = Literal["done", "failed", "skipped_budget"]
_FINISHED: frozenset[str] = frozenset({"done", "failed"})

# A full device queue is back-pressure, not a failure: wait and try again this many times.
_QUEUE_FULL_RETRIES = 120
_EPSILON_USD = 1e-12

_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}


class BatchError(errors.InvalidRequestError):
    """The batch as a whole cannot run: unreadable input, a folder that holds another run."""

    code = "batch_invalid"


# ---------------------------------------------------------------------------------------------
# Input: JSONL or CSV rows -> ImageRequest, validated at the edge with line numbers.
# ---------------------------------------------------------------------------------------------

_STR_FIELDS = (
    "prompt",
    "model",
    "negative_prompt",
    "scheduler",
    "preset",
    "quality",
    "style",
    "background",
    "moderation",
    "user",
)
_INT_FIELDS = ("n", "seed", "steps", "output_compression")
_FLOAT_FIELDS = ("guidance_scale",)
_FORMATS: Mapping[str, OutputFormat] = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
# The fields a row may carry: those of POST /v1/images/generations that decide an image.
KNOWN_FIELDS: frozenset[str] = frozenset(
    {*_STR_FIELDS, *_INT_FIELDS, *_FLOAT_FIELDS, "size", "output_format"}
)
_HINTS = {
    "width": 'give the size as size "WIDTHxHEIGHT"',
    "height": 'give the size as size "WIDTHxHEIGHT"',
    "response_format": "a batch always writes image files into --out; drop the field",
}


@dataclass(frozen=True)
class BatchDefaults:
    """Command-line defaults; a row's own fields win over them."""

    model: str | None = None
    preset: str | None = None


@dataclass(frozen=True)
class BatchRow:
    """One input request. `request` is None when the row failed validation (`error` says why,
    `param` names the field)."""

    row: int  # 1-based position among the input's requests
    line: int  # line of the input file where the row starts
    request: ImageRequest | None
    error: str | None = None
    param: str | None = None

    def describe_error(self) -> str:
        return f"line {self.line}: {self.error}"


def read_rows(path: Path, defaults: BatchDefaults = BatchDefaults()) -> list[BatchRow]:
    """Rows of a JSONL file (one JSON object per line) or a CSV file with a header row,
    chosen by suffix (.csv / .jsonl, .ndjson, .json) or, failing that, by the first character."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BatchError(f"FILE: no such file '{path}'", param="file") from None
    except UnicodeDecodeError:
        raise BatchError(f"FILE: '{path}' is not UTF-8 text", param="file") from None
    except OSError as exc:
        raise BatchError(f"FILE: cannot read '{path}': {exc.strerror}", param="file") from None
    if text.lstrip().startswith("["):
        raise BatchError(
            f"FILE: '{path}' holds a JSON array; write one JSON object per line (JSONL)",
            param="file",
        )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = parse_csv(text, defaults)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        rows = parse_jsonl(text, defaults)
    else:
        rows = (parse_jsonl if text.lstrip().startswith("{") else parse_csv)(text, defaults)
    if not rows:
        raise BatchError(
            f"FILE: '{path}' holds no requests; write one JSON object per line, or a CSV "
            "header row (prompt,seed,...) and one row per request",
            param="file",
        )
    return rows


def parse_jsonl(text: str, defaults: BatchDefaults = BatchDefaults()) -> list[BatchRow]:
    rows: list[BatchRow] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        number = len(rows) + 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(
                BatchRow(number, line_no, None, f"not valid JSON: {exc.msg} (column {exc.colno})")
            )
            continue
        if not isinstance(obj, dict):
            rows.append(
                BatchRow(
                    number,
                    line_no,
                    None,
                    f"each line must be a JSON object, got {type(obj).__name__}",
                )
            )
            continue
        rows.append(_row_from_fields(number, line_no, obj, defaults))
    return rows


def parse_csv(text: str, defaults: BatchDefaults = BatchDefaults()) -> list[BatchRow]:
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[BatchRow] = []
    last_line = 0
    for record in reader:
        start, last_line = last_line + 1, reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        if header is None:
            header = [cell.strip() for cell in record]
            continue
        number = len(rows) + 1
        if len(record) > len(header):
            rows.append(
                BatchRow(
                    number,
                    start,
                    None,
                    f"has {len(record)} values but the header names {len(header)} columns",
                )
            )
            continue
        fields: dict[str, Any] = {}
        for name, cell in zip(header, record, strict=False):
            # An empty cell means "not given", so defaults apply.
            if cell.strip():
                fields[name] = cell
        rows.append(_row_from_fields(number, start, fields, defaults))
    return rows


def rows_from_objects(
    objects: Sequence[Mapping[str, Any]], defaults: BatchDefaults = BatchDefaults()
) -> list[BatchRow]:
    """Rows from already-decoded request objects (an HTTP body); `line` is the 1-based index."""
    return [_row_from_fields(i, i, obj, defaults) for i, obj in enumerate(objects, 1)]


def _row_from_fields(
    number: int, line: int, fields: Mapping[str, Any], defaults: BatchDefaults
) -> BatchRow:
    try:
        request = request_from_fields(fields, defaults=defaults)
    except errors.ImagegenError as exc:
        return BatchRow(number, line, None, exc.message, exc.param)
    return BatchRow(number, line, request)


def request_from_fields(
    fields: Mapping[str, Any], *, defaults: BatchDefaults = BatchDefaults()
) -> ImageRequest:
    """One row's fields (JSON values, or CSV strings) as an ImageRequest. Raises
    InvalidRequestError naming the field; range checks are left to the service."""
    for name in fields:
        if name not in KNOWN_FIELDS:
            raise errors.InvalidRequestError(_unknown_field(str(name)), param=str(name))
    values: dict[str, Any] = {}
    for name in _STR_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise errors.InvalidRequestError(
                f"{name} must be a string, got {json.dumps(value)}", param=name
            )
        values[name] = value
    for name in _INT_FIELDS:
        if fields.get(name) is not None:
            values[name] = _as_int(name, fields[name])
    for name in _FLOAT_FIELDS:
        if fields.get(name) is not None:
            values[name] = _as_float(name, fields[name])
    if fields.get("size") is not None:
        values["width"], values["height"] = _parse_size(fields["size"])
    if fields.get("output_format") is not None:
        fmt = fields["output_format"]
        if not isinstance(fmt, str) or fmt.strip().lower() not in _FORMATS:
            raise errors.InvalidRequestError(
                f"output_format must be png, jpeg or webp, got {json.dumps(fmt)}",
                param="output_format",
            )
        values["output_format"] = _FORMATS[fmt.strip().lower()]
    if "prompt" not in values:
        raise errors.InvalidRequestError(
            "prompt is missing: every row needs a prompt", param="prompt"
        )
    values.setdefault("model", defaults.model)
    values.setdefault("preset", defaults.preset)
    return ImageRequest(**values)


def _unknown_field(name: str) -> str:
    hint = _HINTS.get(name)
    if hint is None:
        close = difflib.get_close_matches(name, sorted(KNOWN_FIELDS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else ""
    known = ", ".join(sorted(KNOWN_FIELDS))
    return f"unknown field '{name}'{'; ' + hint if hint else ''} (known fields: {known})"


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise errors.InvalidRequestError(f"{name} must be an integer, got {value}", param=name)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise errors.InvalidRequestError(
        f"{name} must be an integer, got {json.dumps(value)}", param=name
    )


def _as_float(name: str, value: Any) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise errors.InvalidRequestError(
            f"{name} must be a number, got {json.dumps(value)}", param=name
        )
    return number


def _parse_size(value: Any) -> tuple[int, int]:
    parts = value.strip().lower().split("x") if isinstance(value, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise errors.InvalidRequestError(
            f"size must be WIDTHxHEIGHT (for example 1024x1024), got {json.dumps(value)}",
            param="size",
        )
    return int(parts[0]), int(parts[1])


def rows_fingerprint(rows: Sequence[BatchRow]) -> str:
    """sha256 over every row as parsed (defaults applied): a folder is resumed only with the
    same input."""
    items = [
        [r.row, r.line, dataclasses.asdict(r.request) if r.request else {"error": r.error}]
        for r in rows
    ]
    return hashlib.sha256(canonical_json(items).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# The manifest: one line per row outcome.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest line. `images` are paths relative to the batch folder; `quality` and
    `near_duplicate_of` run parallel to them (`near_duplicate_of[i]` is the earlier image of
    this batch that image i nearly repeats, or None)."""

    row: int
    line: int
    status: RowStatus
    model: str | None = None
    provider: str | None = None
    cached: bool = False
    images: tuple[str, ...] = ()
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

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("images", "seeds", "quality", "near_duplicate_of"):
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
    latest: dict[int, ManifestEntry] = {}
    for obj in _read_complete_lines(path, repair=False):
        entry = _entry_or_none(obj, path)
        if entry is not None:
            latest[entry.row] = entry
    return latest


def _entry_or_none(obj: Mapping[str, Any], path: Path) -> ManifestEntry | None:
    try:
        return ManifestEntry.from_json(obj)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("%s: ignoring a malformed manifest line (%s)", path, exc)
        return None


def _read_complete_lines(path: Path, *, repair: bool) -> list[dict[str, Any]]:
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


def _append(fd: int, data: bytes) -> None:
    """The whole line in one write (looping only on a short write), then fsync."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("short write to the batch manifest")
        view = view[written:]
    os.fsync(fd)


def _line(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


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


class BatchFolder:
    """The output folder's state: `batch.json` (batch id = the ledger tag, input fingerprint),
    the append-only `manifest.jsonl`, the `seeds.jsonl` sidecar, and the images."""

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
        self._manifest_fd: int | None = None
        self._seeds_fd: int | None = None

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @classmethod
    def open(cls, path: Path, *, fingerprint: str, resume: bool, source: str = "") -> BatchFolder:
        """Start a batch in `path`, or with `resume` continue the one it holds. Without
        `resume`, a folder whose manifest already has lines is refused."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BatchError(
                f"--out: cannot create folder '{path}': {exc.strerror}", param="out"
            ) from None
        manifest = path / MANIFEST_NAME
        state_path = path / STATE_NAME
        has_lines = manifest.is_file() and manifest.stat().st_size > 0
        if has_lines and not resume:
            raise BatchError(
                f"--out: '{path}' already holds a batch manifest ({manifest.name}); pass "
                "--resume to continue that batch, or choose another --out folder",
                param="out",
            )
        _remove_temp_files(path)
        state = _read_state(state_path, strict=resume) if state_path.is_file() else None
        # A run that recorded nothing yet is continued too when its requests are the same:
        # its seeds and batch id are kept, so nothing it already generated is billed again.
        if state is not None and (resume or state.get("fingerprint") == fingerprint):
            if state.get("fingerprint") != fingerprint:
                raise BatchError(
                    f"--resume: the requests differ from those of the batch in '{path}' "
                    f"({state.get('batch_id')}, started {state.get('created')}): FILE, --model "
                    "or --preset changed. Resume with the same ones, or choose another --out "
                    "folder",
                    param="resume",
                )
            lines = _read_complete_lines(manifest, repair=True)
            entries = [e for e in (_entry_or_none(o, manifest) for o in lines) if e is not None]
            seeds = _read_seeds(path / SEEDS_NAME, repair=True)
            folder = cls(
                path,
                batch_id=str(state["batch_id"]),
                fingerprint=fingerprint,
                entries=entries,
                seeds=seeds,
            )
        else:
            if has_lines:
                raise BatchError(
                    f"--resume: '{path}' has a manifest but no {STATE_NAME}, so it cannot be "
                    "resumed; choose another --out folder",
                    param="resume",
                )
            batch_id = "batch_" + uuid.uuid4().hex[:20]
            atomic_write(
                state_path,
                json.dumps(
                    {
                        "schema": _STATE_SCHEMA,
                        "batch_id": batch_id,
                        "fingerprint": fingerprint,
                        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        "source": source,
                    },
                    indent=2,
                ).encode("utf-8"),
            )
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
        return {row for row, e in self.latest.items() if e.status in _FINISHED}

    def append(self, entry: ManifestEntry) -> None:
        if self._manifest_fd is None:
            raise RuntimeError("the batch folder is closed")
        _append(self._manifest_fd, _line(entry.to_json()))
        self.entries.append(entry)
        self.latest[entry.row] = entry

    def record_seeds(self, seeds: Mapping[int, int]) -> None:
        """Persist chosen seeds (all in one write) before any of their rows runs."""
        if not seeds:
            return
        if self._seeds_fd is None:
            raise RuntimeError("the batch folder is closed")
        data = b"".join(_line({"row": row, "seed": seed}) for row, seed in seeds.items())
        _append(self._seeds_fd, data)
        self.seeds.update(seeds)

    def close(self) -> None:
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


def _read_state(path: Path, *, strict: bool) -> dict[str, Any] | None:
    """The folder's batch.json; unreadable is an error when resuming, else None (replaced)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if not strict:
            return None
        raise BatchError(f"--resume: cannot read '{path}': {exc}", param="resume") from None
    if not isinstance(state, dict) or "batch_id" not in state:
        if not strict:
            return None
        raise BatchError(f"--resume: '{path}' is not a batch state file", param="resume")
    return state


def _read_seeds(path: Path, *, repair: bool) -> dict[int, int]:
    seeds: dict[int, int] = {}
    for obj in _read_complete_lines(path, repair=repair):
        row, seed = obj.get("row"), obj.get("seed")
        if isinstance(row, int) and isinstance(seed, int):
            seeds[row] = seed
    return seeds


def _remove_temp_files(path: Path) -> None:
    """Half-written images of a killed run (atomic_write's temp files) are never referenced."""
    for item in path.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            item.unlink()


def pending_rows(rows: Sequence[BatchRow], finished: Iterable[int]) -> list[BatchRow]:
    done = set(finished)
    return [r for r in rows if r.row not in done]


# ---------------------------------------------------------------------------------------------
# Near-duplicates within a batch.
# ---------------------------------------------------------------------------------------------


class DuplicateIndex:
    """Finds an earlier image whose perceptual hash is within `max_distance` bits, without
    comparing against every image: two hashes that close agree exactly on at least one of
    `max_distance + 1` disjoint bit bands (pigeonhole), so only band-mates are compared."""

    def __init__(self, max_distance: int = 4) -> None:
        if max_distance < 0:
            raise ValueError(f"max_distance must be >= 0, got {max_distance}")
        self.max_distance = max_distance
        self._bands: dict[tuple[int, int, int], list[tuple[int, str, str]]] = {}
        self._count = 0

    def _keys(self, phash: str) -> list[tuple[int, int, int]]:
        bits = len(phash) * 4
        value = int(phash, 16)
        bands = self.max_distance + 1
        keys = []
        for b in range(bands):
            start, end = b * bits // bands, (b + 1) * bits // bands
            keys.append((bits, b, (value >> start) & ((1 << (end - start)) - 1)))
        return keys

    def find(self, phash: str) -> str | None:
        """The earliest added image within `max_distance` bits of `phash`, or None."""
        if not _is_hex(phash):
            return None
        best: tuple[int, str] | None = None
        for key in self._keys(phash):
            for order, other, ref in self._bands.get(key, ()):
                if (best is None or order < best[0]) and hamming(phash, other) <= (
                    self.max_distance
                ):
                    best = (order, ref)
        return None if best is None else best[1]

    def add(self, phash: str, ref: str) -> None:
        if not _is_hex(phash):
            return
        self._count += 1
        for key in self._keys(phash):
            self._bands.setdefault(key, []).append((self._count, phash, ref))


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdefABCDEF" for c in text)


# ---------------------------------------------------------------------------------------------
# Cost: estimates for the dry run and reservations for the budget.
# ---------------------------------------------------------------------------------------------

_ShapeKey = tuple[str, int, int, int | None, str | None]


def _shape(params: GenerationParams) -> _ShapeKey:
    return (params.model, params.width, params.height, params.steps, params.quality)


class _Budget:
    """The hard cap. A row starts only after reserving its estimate; spend is read from the
    ledger (this batch's tag: every run of it, failed attempts included), so reservations
    plus spend never pass the cap while estimates hold."""

    def __init__(self, service: ImageService, tag: str, cap_usd: float, margin: float) -> None:
        self.service = service
        self.tag = tag
        self.cap_usd = cap_usd
        self.margin = margin
        self.reserved: dict[int, float] = {}
        # Largest USD per image seen, by shape: a local model's measured device time at this
        # size and step count, or a hosted model's billed price when it gives no estimate.
        self.per_image: dict[_ShapeKey, float] = {}

    def spent(self) -> float:
        return self.service.spent(self.tag)

    def headroom(self) -> float:
        return self.cap_usd - self.spent() - sum(self.reserved.values())

    def estimate(self, prepared: PreparedRequest) -> float | None:
        """USD to reserve for a row; None when nothing is known yet (run it alone)."""
        if prepared.cached:
            return 0.0
        params = prepared.params
        if not prepared.backend.is_local:
            quoted = prepared.backend.estimate_cost_usd(params)
            if quoted is not None:
                return float(quoted)
        per_image = self.per_image.get(_shape(params))
        return None if per_image is None else per_image * params.n * self.margin

    def observe(
        self, params: Mapping[str, Any], model: str | None, cost_usd: float, images: int
    ) -> None:
        if model is None or images <= 0 or cost_usd <= 0:
            return
        key: _ShapeKey = (
            model,
            int(params.get("width", 0)),
            int(params.get("height", 0)),
            params.get("steps"),
            params.get("quality"),
        )
        per_image = cost_usd / images
        self.per_image[key] = max(per_image, self.per_image.get(key, 0.0))


# ---------------------------------------------------------------------------------------------
# Running a batch.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchOptions:
    concurrency: int = 4
    budget_usd: float | None = None
    # Local device time is measured after a row runs and jitters from call to call: a row
    # reserves this multiple of the dearest image of its shape (model, size, steps) measured
    # so far in the batch. A hosted backend's estimate (its price table) is reserved as is.
    reserve_margin: float = 2.0
    # Images within this many pHash bits of an earlier one are flagged (0 = identical).
    duplicate_distance: int = 4

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise errors.InvalidRequestError(
                f"--concurrency must be at least 1, got {self.concurrency}", param="concurrency"
            )
        if self.budget_usd is not None and not (
            math.isfinite(self.budget_usd) and self.budget_usd >= 0
        ):
            raise errors.InvalidRequestError(
                f"--budget-usd must be a non-negative amount, got {self.budget_usd}",
                param="budget_usd",
            )
        if not (math.isfinite(self.reserve_margin) and self.reserve_margin >= 1):
            raise errors.InvalidRequestError(
                f"reserve_margin must be at least 1, got {self.reserve_margin}",
                param="reserve_margin",
            )
        if self.duplicate_distance < 0:
            raise errors.InvalidRequestError(
                f"duplicate_distance must be >= 0, got {self.duplicate_distance}",
                param="duplicate_distance",
            )


@dataclass(frozen=True)
class BatchSummary:
    """The whole batch as it stands after this run (earlier runs of it included)."""

    batch_id: str
    manifest: Path
    total: int
    done: int
    failed: int
    skipped_budget: int
    # Done rows served from the cache.
    cached: int
    # Rows finished by an earlier run and not repeated by this one.
    resumed: int
    # Rows this run recorded, and the images it wrote.
    ran: int
    images: int
    # What this batch has cost, every run of it and failed attempts included (the ledger).
    cost_usd: float
    saved_usd: float
    gpu_seconds: float
    near_duplicates: int
    elapsed_s: float
    images_per_s: float
    budget_usd: float | None = None

    @property
    def unrecorded(self) -> int:
        """Rows with no outcome (the run was stopped before it reached them)."""
        return self.total - self.done - self.failed - self.skipped_budget

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["manifest"] = str(self.manifest)
        return data


RowCallback = Callable[[ManifestEntry], None]


async def run_batch(
    service: ImageService,
    rows: Sequence[BatchRow],
    folder: BatchFolder,
    *,
    options: BatchOptions = BatchOptions(),
    on_row: RowCallback | None = None,
) -> BatchSummary:
    """Run every row `folder` has not finished, `options.concurrency` at a time, and record
    each outcome in the manifest (then call `on_row` with it). One row's failure never stops
    the others; only an error writing the folder does."""
    run = _BatchRun(service, rows, folder, options, on_row)
    try:
        return await run.run()
    except BaseExceptionGroup as group:
        # TaskGroup wraps the one error that matters (the folder could not be written).
        first = group.exceptions[0]
        raise first from None


class _BatchRun:
    def __init__(
        self,
        service: ImageService,
        rows: Sequence[BatchRow],
        folder: BatchFolder,
        options: BatchOptions,
        on_row: RowCallback | None,
    ) -> None:
        self.service = service
        self.rows = rows
        self.folder = folder
        self.options = options
        self.on_row = on_row
        self.tag = folder.batch_id
        self.budget = (
            _Budget(service, self.tag, options.budget_usd, options.reserve_margin)
            if options.budget_usd is not None
            else None
        )
        self.duplicates = DuplicateIndex(options.duplicate_distance)
        for entry in folder.entries:
            if entry.status == "done":
                self._index(entry)
                if self.budget is not None and not entry.cached:
                    self.budget.observe(
                        entry.params, entry.model, entry.cost_usd, len(entry.images)
                    )
        # Identical requests in flight: a twin waits, then is served from the cache.
        self._inflight: dict[ImageRequest, asyncio.Event] = {}
        self._changed = asyncio.Condition()
        self._write_lock = asyncio.Lock()
        self._ran = 0
        self._images = 0

    async def run(self) -> BatchSummary:
        started = time.perf_counter()
        resumed = len(self.folder.finished_rows() & {r.row for r in self.rows})
        pending = pending_rows(self.rows, self.folder.finished_rows())
        requests = self._requests_with_seeds(pending)
        slots = asyncio.Semaphore(self.options.concurrency)
        async with asyncio.TaskGroup() as group:
            for row in pending:
                request = requests.get(row.row)
                if request is None:
                    await self._record(self._failed(row, row.error or "invalid row", row.param))
                    continue
                await slots.acquire()
                try:
                    started_task = await self._dispatch(row, request, group, slots)
                except BaseException:
                    slots.release()
                    raise
                if not started_task:
                    slots.release()
        return self._summary(time.perf_counter() - started, resumed)

    def _requests_with_seeds(self, pending: Sequence[BatchRow]) -> dict[int, ImageRequest]:
        """Every valid row as it will run: tagged with the batch id and with a concrete seed
        (the row's own, or one chosen now and persisted before anything runs)."""
        chosen: dict[int, int] = {}
        requests: dict[int, ImageRequest] = {}
        for row in pending:
            if row.request is None:
                continue
            seed = row.request.seed
            if seed is None:
                seed = self.folder.seeds.get(row.row)
                if seed is None:
                    seed = chosen[row.row] = secrets.randbelow(MAX_SEED - MAX_N)
            requests[row.row] = dataclasses.replace(row.request, seed=seed, tag=self.tag)
        self.folder.record_seeds(chosen)
        return requests

    async def _dispatch(
        self,
        row: BatchRow,
        request: ImageRequest,
        group: asyncio.TaskGroup,
        slots: asyncio.Semaphore,
    ) -> bool:
        """Start the row (True: a task now owns the slot) or settle it here (False)."""
        if self.budget is None:
            group.create_task(self._run_row(row, request, slots))
            return True
        budget = self.budget
        try:
            prepared = self.service.prepare(request)
        except errors.ImagegenError as exc:
            await self._record(self._failed(row, exc.message, exc.param, model=request.model))
            return False
        except Exception as exc:
            log.exception("batch row %d (line %d) could not be prepared", row.row, row.line)
            message = f"internal error: {type(exc).__name__}: {exc}"
            await self._record(self._failed(row, message, None, model=request.model))
            return False
        estimate = budget.estimate(prepared)
        if estimate is None:
            # Nothing known about this shape's cost: run it alone, so that no other row is
            # in flight if it turns out dearer than the headroom; it prices the ones after it.
            async with self._changed:
                await self._changed.wait_for(lambda: not budget.reserved)
            estimate = budget.estimate(prepared)
        if estimate is None:
            if budget.headroom() <= _EPSILON_USD:
                await self._record(self._skipped(row, prepared, None))
                return False
            budget.reserved[row.row] = 0.0
            await self._run_row(row, request, None)
            return False
        if estimate > 0:
            async with self._changed:
                # In-flight rows hold reservations; as they finish, actual spend replaces
                # them and the headroom may grow back enough for this row.
                await self._changed.wait_for(
                    lambda: not budget.reserved or budget.headroom() - estimate >= -_EPSILON_USD
                )
            if budget.headroom() - estimate < -_EPSILON_USD:
                await self._record(self._skipped(row, prepared, estimate))
                return False
        budget.reserved[row.row] = estimate
        group.create_task(self._run_row(row, request, slots, reserved=estimate))
        return True

    async def _run_row(
        self,
        row: BatchRow,
        request: ImageRequest,
        slots: asyncio.Semaphore | None,
        *,
        reserved: float | None = None,
    ) -> None:
        try:
            entry = await self._execute(row, request)
            if reserved is not None:
                entry = dataclasses.replace(entry, reserved_usd=reserved)
            await self._record(entry)
        finally:
            if self.budget is not None:
                self.budget.reserved.pop(row.row, None)
            async with self._changed:
                self._changed.notify_all()
            if slots is not None:
                slots.release()

    async def _execute(self, row: BatchRow, request: ImageRequest) -> ManifestEntry:
        while (twin := self._inflight.get(request)) is not None:
            await twin.wait()
        mine = self._inflight[request] = asyncio.Event()
        try:
            result = await self._generate(request)
        except errors.ImagegenError as exc:
            return self._failed(row, exc.message, exc.param, model=request.model)
        except Exception as exc:
            log.exception("batch row %d (line %d) failed", row.row, row.line)
            return self._failed(
                row, f"internal error: {type(exc).__name__}: {exc}", None, model=request.model
            )
        finally:
            del self._inflight[request]
            mine.set()
        # Images reach the folder (atomically) before the manifest line that names them.
        names = [
            f"{row.row:06d}-{i}.{_EXT.get(img.format, 'png')}"
            for i, img in enumerate(result.images)
        ]
        duplicates = self._flag_duplicates(result, names)
        await asyncio.to_thread(self._write_images, result, names)
        entry = self._done(row, result, names, duplicates)
        if self.budget is not None and not result.cached:
            self.budget.observe(entry.params, entry.model, entry.cost_usd, len(names))
        return entry

    async def _generate(self, request: ImageRequest) -> GenerationResult:
        for attempt in range(_QUEUE_FULL_RETRIES + 1):
            try:
                return await self.service.generate(request)
            except errors.QueueFullError as exc:
                if attempt == _QUEUE_FULL_RETRIES:
                    raise
                await asyncio.sleep(min(float(exc.retry_after_s), 2.0))
        raise AssertionError("unreachable")

    def _write_images(self, result: GenerationResult, names: Sequence[str]) -> None:
        for img, name in zip(result.images, names, strict=True):
            atomic_write(self.folder.path / name, img.data)

    def _flag_duplicates(
        self, result: GenerationResult, names: Sequence[str]
    ) -> tuple[str | None, ...]:
        flags: list[str | None] = []
        for img, name in zip(result.images, names, strict=True):
            phash = str(img.quality.get("phash") or "")
            flags.append(self.duplicates.find(phash) if phash else None)
            if phash:
                self.duplicates.add(phash, name)
        return tuple(flags)

    def _index(self, entry: ManifestEntry) -> None:
        for name, quality in zip(entry.images, entry.quality, strict=False):
            phash = str(quality.get("phash") or "")
            if phash:
                self.duplicates.add(phash, name)

    async def _record(self, entry: ManifestEntry) -> None:
        async with self._write_lock:
            await asyncio.to_thread(self.folder.append, entry)
        self._ran += 1
        if entry.status == "done":
            self._images += len(entry.images)
        if self.on_row is not None:
            self.on_row(entry)

    # -- entries -------------------------------------------------------------------------

    def _done(
        self,
        row: BatchRow,
        result: GenerationResult,
        names: Sequence[str],
        duplicates: tuple[str | None, ...],
    ) -> ManifestEntry:
        p = result.params
        return ManifestEntry(
            row=row.row,
            line=row.line,
            status="done",
            model=result.model,
            provider=result.provider,
            cached=result.cached,
            images=tuple(names),
            seeds=tuple(result.seeds),
            cost_usd=result.cost_usd,
            gpu_seconds=result.gpu_seconds,
            saved_usd=result.saved_usd,
            quality=tuple(img.quality for img in result.images),
            near_duplicate_of=duplicates,
            params=_params_record(p),
            request_id=result.request_id,
        )

    def _failed(
        self, row: BatchRow, message: str, param: str | None, *, model: str | None = None
    ) -> ManifestEntry:
        return ManifestEntry(
            row=row.row, line=row.line, status="failed", model=model, error=message, param=param
        )

    def _skipped(
        self, row: BatchRow, prepared: PreparedRequest, estimate: float | None
    ) -> ManifestEntry:
        assert self.budget is not None
        return ManifestEntry(
            row=row.row,
            line=row.line,
            status="skipped_budget",
            model=prepared.params.model,
            provider=prepared.provider,
            params=_params_record(prepared.params),
            reserved_usd=estimate,
            error=f"the budget of ${self.budget.cap_usd:g} cannot cover this row",
        )

    def _summary(self, elapsed: float, resumed: int) -> BatchSummary:
        latest = self.folder.latest
        outcomes = [latest[r.row] for r in self.rows if r.row in latest]
        done = [e for e in outcomes if e.status == "done"]
        return BatchSummary(
            batch_id=self.tag,
            manifest=self.folder.manifest_path,
            total=len(self.rows),
            done=len(done),
            failed=sum(e.status == "failed" for e in outcomes),
            skipped_budget=sum(e.status == "skipped_budget" for e in outcomes),
            cached=sum(e.cached for e in done),
            resumed=resumed,
            ran=self._ran,
            images=self._images,
            cost_usd=self.service.spent(self.tag),
            saved_usd=sum(e.saved_usd for e in done),
            gpu_seconds=sum(e.gpu_seconds for e in done),
            near_duplicates=sum(d is not None for e in done for d in e.near_duplicate_of),
            elapsed_s=elapsed,
            images_per_s=self._images / elapsed if elapsed > 0 else 0.0,
            budget_usd=self.options.budget_usd,
        )


def _params_record(p: GenerationParams) -> dict[str, Any]:
    return {
        "width": p.width,
        "height": p.height,
        "n": p.n,
        "seed": p.seed,
        "steps": p.steps,
        "guidance_scale": p.guidance_scale,
        "scheduler": p.scheduler,
        "quality": p.quality,
        "output_format": p.output_format,
    }


# ---------------------------------------------------------------------------------------------
# Dry run: validate every row and project the cost before anything is spent.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowProblem:
    row: int
    line: int
    message: str
    param: str | None = None

    def describe(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class ModelProjection:
    """Projected cost of the rows for one model. `usd` covers the rows with a figure;
    `unpriced_rows` have none (a local model never run here, a hosted one without a price)."""

    provider: str
    model: str
    rows: int
    images: int
    cached_rows: int
    usd: float
    unpriced_rows: int
    basis: str


@dataclass(frozen=True)
class BatchPlan:
    total: int
    # Rows an earlier run of this folder already finished (not projected).
    finished: int
    valid: int
    problems: tuple[RowProblem, ...]
    models: tuple[ModelProjection, ...]

    @property
    def usd(self) -> float:
        return sum(m.usd for m in self.models)

    @property
    def unpriced_rows(self) -> int:
        return sum(m.unpriced_rows for m in self.models)

    def by_provider(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for m in self.models:
            totals[m.provider] = totals.get(m.provider, 0.0) + m.usd
        return dict(sorted(totals.items()))


def plan_batch(
    service: ImageService, rows: Sequence[BatchRow], *, finished: Iterable[int] = ()
) -> BatchPlan:
    """Check every row as `generate` would (fields, preset, sanitizer, model, sizes) and
    project its cost: local models from their measured seconds per image in the ledger times
    the configured USD per GPU-hour, hosted ones from the backend's estimate (else what the
    model has cost per image before). Runs nothing and spends nothing."""
    done = set(finished)
    problems: list[RowProblem] = []
    acc: dict[tuple[str, str], dict[str, Any]] = {}
    valid = 0
    for row in rows:
        if row.row in done:
            continue
        if row.request is None:
            problems.append(RowProblem(row.row, row.line, row.error or "invalid row", row.param))
            continue
        try:
            prepared = service.prepare(row.request)
        except errors.ImagegenError as exc:
            problems.append(RowProblem(row.row, row.line, exc.message, exc.param))
            continue
        except Exception as exc:
            log.exception("dry run: row %d (line %d)", row.row, row.line)
            problems.append(
                RowProblem(row.row, row.line, f"internal error: {type(exc).__name__}: {exc}")
            )
            continue
        valid += 1
        params = prepared.params
        slot = acc.setdefault(
            (prepared.provider, params.model),
            {
                "rows": 0,
                "images": 0,
                "cached": 0,
                "usd": 0.0,
                "unpriced": 0,
                "basis": "",
            },
        )
        slot["rows"] += 1
        slot["images"] += params.n
        if prepared.cached:
            slot["cached"] += 1
            continue
        usd, basis = _projected_usd(service, prepared)
        slot["basis"] = slot["basis"] or basis
        if usd is None:
            slot["unpriced"] += 1
        else:
            slot["usd"] += usd
    models = tuple(
        ModelProjection(
            provider=provider,
            model=model,
            rows=s["rows"],
            images=s["images"],
            cached_rows=s["cached"],
            usd=s["usd"],
            unpriced_rows=s["unpriced"],
            basis=s["basis"] or "served from the cache",
        )
        for (provider, model), s in sorted(acc.items())
    )
    return BatchPlan(
        total=len(rows),
        finished=len(done & {r.row for r in rows}),
        valid=valid,
        problems=tuple(problems),
        models=models,
    )


def _projected_usd(service: ImageService, prepared: PreparedRequest) -> tuple[float | None, str]:
    return prepared.estimate.usd, prepared.estimate.basis
