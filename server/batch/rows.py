"""Batch input: JSONL or CSV (a file, an upload, or decoded objects) read into rows, each checked
by the one request schema (server/request_schema.ImageFields) and carrying its line number; a
bad row keeps its error and the field at fault, and fails alone."""

from __future__ import annotations

import contextlib
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
from server.request_schema import LAX, RowFields, base64_image

# The fields a row may carry: those of POST /v1/images/generations that decide an image, the
# edit fields, and the inputs (`image`, `mask`).
KNOWN_FIELDS: frozenset[str] = frozenset(RowFields.model_fields)
# The image types an input cell may hold as raw base64 (their magic numbers): text that
# decodes to one of them is the image itself, anything else is a path.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")
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
    """Defaults for every row (command-line options, HTTP options); a row's own fields win.
    `folder` is where input paths of rows are read from (the batch file's folder; None over
    HTTP, where inputs are base64 only); paths never leave it unless `allow_absolute_paths`."""

    model: str | None = None
    preset: str | None = None
    folder: Path | None = None
    allow_absolute_paths: bool = False


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
    folder = defaults.folder or path.resolve().parent
    return rows_from_bytes(
        data, name=path.name, defaults=dataclasses.replace(defaults, folder=folder)
    )


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
        if lax:
            parsed = RowFields.model_validate(dict(fields), strict=False, context=LAX)
        else:
            parsed = RowFields.model_validate(dict(fields))
    except ValidationError as exc:
        found = sorted(exc.errors(include_url=False), key=lambda e: _FIRST.get(e["type"], 2))
        raise _field_error(found[0]) from None
    request = parsed.with_edit_fields(parsed.to_image_request())
    texts = [parsed.image] if isinstance(parsed.image, str) else parsed.image or []
    return dataclasses.replace(
        request,
        model=defaults.model if request.model is None else request.model,
        preset=defaults.preset if request.preset is None else request.preset,
        images=tuple(input_bytes(text, "image", defaults) for text in texts),
        mask=input_bytes(parsed.mask, "mask", defaults) if parsed.mask is not None else None,
    )


def input_bytes(text: str, field: str, defaults: BatchDefaults) -> bytes:
    """An input cell's image: a `data:` URL, raw base64 of an image file, or (in a batch file
    on disk) a path relative to the file's folder. A path may not leave that folder (`..`, a
    symlink out, an absolute path) unless absolute paths are allowed."""
    if text.startswith("data:"):
        return base64_image(text, param=field)
    if defaults.folder is None:
        try:
            return base64_image(text, param=field)
        except errors.InvalidRequestError:
            raise errors.InvalidRequestError(
                f"{field} is not valid base64; rows sent over HTTP carry their images as base64 "
                "or data: URLs (paths are read only by `imagegen batch` from the batch file's "
                "folder)",
                param=field,
            ) from None
    with contextlib.suppress(errors.InvalidRequestError):
        data = base64_image(text, param=field)
        if data.startswith(_IMAGE_MAGIC):
            return data
    folder = defaults.folder.resolve()
    given = Path(text)
    if given.is_absolute() and not defaults.allow_absolute_paths:
        raise errors.InvalidRequestError(
            f"{field}: '{text}' is an absolute path; name files relative to the batch file's "
            "folder, or allow absolute paths (imagegen batch --allow-absolute-paths)",
            param=field,
        )
    path = (folder / given).resolve()
    if not defaults.allow_absolute_paths and not path.is_relative_to(folder):
        raise errors.InvalidRequestError(
            f"{field}: '{text}' leads outside the batch file's folder ('..' or a symlink); "
            "keep inputs inside it, or allow absolute paths (--allow-absolute-paths)",
            param=field,
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise errors.InvalidRequestError(
            f"{field}: cannot read '{text}' (relative to the batch file's folder): {exc.strerror}",
            param=field,
        ) from None


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
        [r.row, r.line, _fingerprinted(r.request) if r.request else {"error": r.error}]
        for r in rows
    ]
    return hashlib.sha256(canonical_json(items).encode("utf-8")).hexdigest()


def _fingerprinted(request: ImageRequest) -> dict[str, Any]:
    """The request as JSON: input images by their sha256 (bytes are not JSON)."""
    fields = dataclasses.asdict(request)
    # Who runs the batch is not part of its input.
    fields.pop("caller", None)
    fields["images"] = [hashlib.sha256(data).hexdigest() for data in request.images]
    if request.mask is not None:
        fields["mask"] = hashlib.sha256(request.mask).hexdigest()
    if not request.images and request.mask is None:
        # Rows without inputs keep the fingerprint they had (a batch folder resumes).
        for name in (
            "images",
            "mask",
            "mask_convention",
            "strength",
            "mask_blur",
            "inpaint_area",
            "inpaint_padding",
            "resize_mode",
            "input_fidelity",
        ):
            fields.pop(name)
    if not request.loras:
        fields.pop("loras")
    return fields


def pending_rows(rows: Sequence[BatchRow], finished: set[int]) -> list[BatchRow]:
    return [r for r in rows if r.row not in finished]
