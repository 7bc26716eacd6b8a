"""Batch input: JSONL or CSV (a file, an upload, or decoded objects) read into rows, each checked
by the one request schema (server/request_schema.ImageFields) and carrying its line number; a
bad row keeps its error and the field at fault, and fails alone."""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from server import errors
from server.batch.errors import BatchError
from server.cache import canonical_json
from server.request import ImageRequest
from server.request_schema import ImageFields

# The fields a row may carry: those of POST /v1/images/generations that decide an image.
KNOWN_FIELDS: frozenset[str] = frozenset(ImageFields.model_fields)
_HINTS = {
    "width": 'give the size as size "WIDTHxHEIGHT"',
    "height": 'give the size as size "WIDTHxHEIGHT"',
    "response_format": "a batch always writes image files into its folder; drop the field",
    "stream": "a batch reports progress per row through its job; drop the field",
}
# An unknown field explains the errors after it (`width` for `size`): it is reported first.
_FIRST = {"extra_forbidden": 0, "missing": 1}
_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
_JSONL_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/json"})


@dataclass(frozen=True)
class BatchDefaults:
    """Defaults for every row (command-line options, HTTP options); a row's own fields win."""

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


def read_rows(path: Path, defaults: BatchDefaults = BatchDefaults()) -> list[BatchRow]:
    """Rows of a JSONL or CSV file (see `rows_from_bytes`)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BatchError("{file} does not exist", param="file") from None
    except OSError as exc:
        raise BatchError(
            "{file} cannot be read: {reason}", param="file", reason=exc.strerror
        ) from None
    return rows_from_bytes(data, name=path.name, defaults=defaults)


def rows_from_bytes(
    data: bytes,
    *,
    name: str = "",
    content_type: str = "",
    defaults: BatchDefaults = BatchDefaults(),
) -> list[BatchRow]:
    """Rows of JSONL (one JSON object per line) or CSV with a header row, chosen by the file
    name's suffix, else its content type, else its first character."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BatchError(
            "{file} must be UTF-8 text: JSONL (one JSON object per line) or CSV", param="file"
        ) from None
    start = text.lstrip()[:1]
    if start == "[":
        raise BatchError(
            "{file} holds a JSON array; write one JSON object per line (JSONL)", param="file"
        )
    suffix = PurePosixPath(name).suffix.lower()
    if suffix == ".csv" or content_type == "text/csv":
        rows = parse_csv(text, defaults)
    elif suffix in _JSONL_SUFFIXES or content_type in _JSONL_TYPES:
        rows = parse_jsonl(text, defaults)
    else:
        rows = (parse_jsonl if start == "{" else parse_csv)(text, defaults)
    if not rows:
        raise BatchError(
            "{file} holds no requests; write one JSON object per line, or a CSV header row "
            "(prompt,seed,...) and one row per request",
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
            message = f"not valid JSON: {exc.msg} (column {exc.colno})"
            rows.append(BatchRow(number, line_no, None, message))
            continue
        rows.append(_row(number, line_no, obj, defaults, lax=False))
    return rows


def parse_csv(text: str, defaults: BatchDefaults = BatchDefaults()) -> list[BatchRow]:
    """CSV cells are all strings: they are read laxly ("16" is 16, "true" is true), and an
    empty cell means "not given", so the defaults apply."""
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
            message = f"has {len(record)} values but the header names {len(header)} columns"
            rows.append(BatchRow(number, start, None, message))
            continue
        cells = {name: cell for name, cell in zip(header, record, strict=False) if cell.strip()}
        rows.append(_row(number, start, cells, defaults, lax=True))
    return rows


def rows_from_objects(
    objects: Sequence[object], defaults: BatchDefaults = BatchDefaults()
) -> list[BatchRow]:
    """Rows from already-decoded JSON values (an HTTP body); `line` is the 1-based index."""
    return [_row(i, i, obj, defaults, lax=False) for i, obj in enumerate(objects, 1)]


def _row(number: int, line: int, obj: object, defaults: BatchDefaults, *, lax: bool) -> BatchRow:
    if not isinstance(obj, Mapping):
        message = f"each request must be a JSON object, got {type(obj).__name__}"
        return BatchRow(number, line, None, message)
    try:
        request = request_from_fields(obj, defaults=defaults, lax=lax)
    except errors.ImagegenError as exc:
        return BatchRow(number, line, None, exc.message, exc.param)
    return BatchRow(number, line, request)


def request_from_fields(
    fields: Mapping[str, Any], *, defaults: BatchDefaults = BatchDefaults(), lax: bool = False
) -> ImageRequest:
    """One row's fields as an ImageRequest: JSON values strictly, CSV strings with `lax`.
    Raises InvalidRequestError naming the field; range checks beyond the schema's are left to
    the service."""
    try:
        parsed = ImageFields.model_validate(dict(fields), strict=False if lax else None)
    except ValidationError as exc:
        found = sorted(exc.errors(include_url=False), key=lambda e: _FIRST.get(e["type"], 2))
        raise _field_error(found[0]) from None
    request = parsed.to_image_request()
    return dataclasses.replace(
        request,
        model=defaults.model if request.model is None else request.model,
        preset=defaults.preset if request.preset is None else request.preset,
    )


def _field_error(error: ErrorDetails) -> errors.InvalidRequestError:
    """The schema's complaint about one field, worded for a row (the field named first)."""
    name = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return errors.InvalidRequestError(_unknown_field(name), param=name)
    if kind == "missing":
        hint = ": every row needs a prompt" if name == "prompt" else ""
        return errors.InvalidRequestError(f"{name} is missing{hint}", param=name)
    shown = json.dumps(error.get("input"), default=str)  # ASCII: safe for any input
    if len(shown) > 80:
        shown = shown[:77] + "..."
    if not name:
        # pydantic places a key it cannot read as text (a lone surrogate) at no field.
        return errors.InvalidRequestError(
            f"every field name must be text UTF-8 can encode, got {shown}"
        )
    message = error["msg"]
    if message.startswith("Input should"):
        message = "should" + message.removeprefix("Input should")
    return errors.InvalidRequestError(f"{name} {message}, got {shown}", param=name)


def _unknown_field(name: str) -> str:
    hint = _HINTS.get(name)
    if hint is None:
        close = difflib.get_close_matches(name, sorted(KNOWN_FIELDS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else ""
    known = ", ".join(sorted(KNOWN_FIELDS))
    return f"unknown field '{name}'{'; ' + hint if hint else ''} (known fields: {known})"


def rows_fingerprint(rows: Sequence[BatchRow]) -> str:
    """sha256 over every row as parsed (defaults applied): a folder is resumed only with the
    same input."""
    items = [
        [r.row, r.line, dataclasses.asdict(r.request) if r.request else {"error": r.error}]
        for r in rows
    ]
    return hashlib.sha256(canonical_json(items).encode("utf-8")).hexdigest()


def pending_rows(rows: Sequence[BatchRow], finished: set[int]) -> list[BatchRow]:
    return [r for r in rows if r.row not in finished]
