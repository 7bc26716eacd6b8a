"""What every provider stub shares: a scripted behaviour queue, a request log, schema checks,
and real image bytes made with Pillow."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse, Response

# The official provider specs the OpenAI and BFL stubs validate requests against: ../shared/specs
# beside the repository (never copied into it), or TEST_PROVIDER_SPECS_DIR (point it at an empty
# folder to see that every test needing them skips with the reason).
SPECS_DIR = Path(
    os.environ.get("TEST_PROVIDER_SPECS_DIR")
    or Path(__file__).resolve().parents[2].parent / "shared" / "specs"
)
SPEC_FILES = ("openai-openapi.yaml", "bfl-openapi.json")


@dataclass
class Step:
    """One scripted answer for a route. `status=None` runs the normal handler (after
    `delay_s`), with `variant` selecting a provider-specific success form ("filtered")."""

    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    variant: str | None = None


def reply(status: int, body: Any = None, **headers: str) -> Step:
    """A scripted error answer; header names use `_` for `-` (retry_after="1")."""
    return Step(
        status=status, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()}
    )


def delay(seconds: float) -> Step:
    return Step(delay_s=seconds)


def variant(name: str) -> Step:
    return Step(variant=name)


@dataclass
class Recorded:
    route: str
    method: str
    path: str
    headers: dict[str, str]
    json: Any = None
    form: dict[str, str] | None = None
    query: dict[str, str] = field(default_factory=dict)
    # Multipart file parts by field name, in the order sent.
    files: dict[str, list[bytes]] = field(default_factory=dict)


class StubState:
    """Per-stub scripts and logs. Tests script routes before calling; the server thread pops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[Step]] = {}
        self.requests: list[Recorded] = []
        # Bumped by reset(): a delayed handler from an earlier test must not act on this one's
        # script when it wakes up.
        self.epoch = 0
        # Every request that broke the provider's wire contract: a test must end with none.
        self.invalid: list[str] = []

    def script(self, route: str, *steps: Step) -> None:
        with self._lock:
            self._scripts.setdefault(route, deque()).extend(steps)

    def next_step(self, route: str) -> Step | None:
        with self._lock:
            queue = self._scripts.get(route)
            return queue.popleft() if queue else None

    def record(self, entry: Recorded) -> None:
        with self._lock:
            self.requests.append(entry)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.invalid.append(reason)

    def count(self, route: str) -> int:
        return sum(1 for r in self.requests if r.route == route)

    def of(self, route: str) -> list[Recorded]:
        return [r for r in self.requests if r.route == route]

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self.requests.clear()
            self.invalid.clear()
            self.epoch += 1


async def scripted(state: StubState, route: str) -> tuple[Response | None, Step | None]:
    """Apply the next step for `route`: its delay, then its scripted answer if it has one."""
    step = state.next_step(route)
    if step is None:
        return None, None
    if step.delay_s:
        epoch = state.epoch
        await asyncio.sleep(step.delay_s)
        if state.epoch != epoch:  # the test that scripted this delay is over
            return Response(status_code=499), step
    if step.status is None:
        return None, step
    if step.body is None or isinstance(step.body, dict | list):
        return JSONResponse(step.body, status_code=step.status, headers=step.headers), step
    return Response(str(step.body), status_code=step.status, headers=step.headers), step


async def read_form(request: Any) -> tuple[dict[str, str], dict[str, list[bytes]], list[str]]:
    """A multipart body as the provider reads it: text fields, file parts by name, and what
    breaks the form rules (not multipart, a text field sent twice)."""
    from starlette.datastructures import UploadFile

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return {}, {}, [f"body must be multipart/form-data, got '{content_type}'"]
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    problems: list[str] = []
    form = await request.form()
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.setdefault(name, []).append(await value.read())
        elif name in fields:
            problems.append(f"field '{name}' was sent twice")
        else:
            fields[name] = value
    return fields, files, problems


@dataclass(frozen=True)
class Picture:
    format: str  # PIL's name: PNG, JPEG, WEBP
    width: int
    height: int
    mode: str


def picture(data: bytes) -> Picture | None:
    """What an uploaded file is, or None when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return Picture(img.format or "", img.width, img.height, img.mode)
    except (UnidentifiedImageError, OSError):
        return None


def alpha_as_white_mask(data: bytes) -> bytes:
    """An OpenAI mask (transparent = edit) read back as ours: mode L, white = repaint, the raw
    pixels (what a test compares with the mask it sent)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        return ImageOps.invert(img.getchannel("A")).tobytes()


def make_image(width: int, height: int, key: str, fmt: str = "png") -> bytes:
    """A solid-colour image whose colour is derived from `key` (prompt and seed), so a
    seeded repeat gives identical bytes."""
    from PIL import Image

    digest = hashlib.sha256(key.encode()).digest()
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), tuple(digest[:3])).save(
        buffer, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    )
    return buffer.getvalue()


def specs_missing() -> str | None:
    """Why the provider specs cannot be used, or None when they are all there."""
    missing = [name for name in SPEC_FILES if not (SPECS_DIR / name).is_file()]
    if not missing:
        return None
    return (
        f"provider specs {', '.join(missing)} not found in {SPECS_DIR} (../shared/specs beside "
        "the repository, or TEST_PROVIDER_SPECS_DIR)"
    )


def require_specs() -> Path:
    """Skip the calling test (or fixture) when the specs are not there."""
    import pytest

    reason = specs_missing()
    if reason is not None:
        pytest.skip(reason)
    return SPECS_DIR


@functools.lru_cache(maxsize=1)
def openai_spec() -> dict[str, Any]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with (SPECS_DIR / "openai-openapi.yaml").open(encoding="utf-8") as handle:
        spec: dict[str, Any] = yaml.load(handle, Loader=loader)
    return spec


@functools.lru_cache(maxsize=1)
def bfl_spec() -> dict[str, Any]:
    spec: dict[str, Any] = json.loads((SPECS_DIR / "bfl-openapi.json").read_text("utf-8"))
    return spec


class SchemaCheck:
    """A JSON-schema validator for one component of an OpenAPI document, with its $refs
    resolved against the document's components. Also rejects properties the schema does not
    name (providers ignore unknown fields silently; a typo must not pass here)."""

    def __init__(self, document: dict[str, Any], schema_name: str) -> None:
        from jsonschema import Draft202012Validator

        schema = document["components"]["schemas"][schema_name]
        self.properties = frozenset(schema.get("properties", {}))
        self.validator = Draft202012Validator({**schema, "components": document["components"]})

    def problems(self, body: Any) -> list[str]:
        found = [
            f"{'/'.join(str(p) for p in e.absolute_path) or '<body>'}: {e.message}"
            for e in self.validator.iter_errors(body)
        ]
        if isinstance(body, dict):
            found += [f"unknown field '{k}'" for k in sorted(set(body) - self.properties)]
        return found
