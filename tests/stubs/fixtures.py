"""Helpers for hosted-backend tests: a recording sleep, fast test configs, params, and running
a stub live for a module."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from models.base import Backend, Events, GenerationParams, InputImage, ModelSpec
from models.catalogue import Catalogue
from models.hosted import make_hosted_backend
from models.hosted.config import ProviderConfig
from tests.stubs.common import StubState
from tests.stubs.live import LiveServer

T = TypeVar("T")

# Short waits so the whole hosted suite stays well under a minute on two cores.
FAST: dict[str, Any] = {
    "timeout_s": 2.0,
    "max_retries": 2,
    "retry_cap_s": 5.0,
    "backoff_base_s": 0.01,
    "poll_interval_s": 0.01,
    "poll_timeout_s": 5.0,
}


class Stub(Protocol):
    state: StubState
    app: Any
    url: str


class RecordingSleep:
    """An injected `sleep` that records each wait and does not wait (unless `real`)."""

    def __init__(self, *, real: bool = False) -> None:
        self.waits: list[float] = []
        self.real = real

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(seconds if self.real else 0)

    @property
    def retry_waits(self) -> list[float]:
        """Waits other than poll intervals (those equal the configured poll interval or grow
        from it): used where a test polls and retries at once."""
        return [w for w in self.waits if w >= 0.5]


S = TypeVar("S", bound=Stub)


@contextmanager
def live(stub: S) -> Iterator[S]:
    """Serve `stub` on 127.0.0.1 for the duration; `stub.url` is its base URL."""
    with LiveServer(stub.app) as server:
        stub.url = server.url
        yield stub


def config(provider: str, base_url: str, api_key: str | None, **overrides: Any) -> ProviderConfig:
    return ProviderConfig.from_mapping(
        provider, {"base_url": base_url, "api_key": api_key, **FAST, **overrides}
    )


def spec(name: str) -> ModelSpec:
    found = Catalogue.load().get(name)
    assert found is not None, f"catalogue has no '{name}'"
    return found


def params(model: str, **overrides: Any) -> GenerationParams:
    base = GenerationParams(
        prompt="a red fox in the snow", model=model, width=1024, height=1024, n=1, seed=42
    )
    return replace(base, **overrides)


def backend(
    model: str, cfg: ProviderConfig, sleep: RecordingSleep | None = None, **kwargs: Any
) -> Backend:
    return make_hosted_backend(spec(model), cfg, sleep=sleep or RecordingSleep(), **kwargs)


class RecordingEvents(Events):
    """Keeps every event a backend reports, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[Any, ...]]] = []

    def queued(self, position: int) -> None:
        self.seen.append(("queued", (position,)))

    def started(self) -> None:
        self.seen.append(("started", ()))

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        self.seen.append(("progress", (step, total)))

    @property
    def steps(self) -> list[tuple[int, int]]:
        return [(int(a[0]), int(a[1])) for kind, a in self.seen if kind == "progress"]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def generate_once(b: Backend, p: GenerationParams, **kwargs: Any) -> Any:
    """Generate and always close the backend's clients (they belong to this event loop)."""
    try:
        return await b.generate(p, **kwargs)
    finally:
        await b.close()


def _input(img: Any) -> InputImage:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    data = buffer.getvalue()
    return InputImage(
        data=data, sha256=hashlib.sha256(data).hexdigest(), width=img.width, height=img.height
    )


def input_image(
    width: int, height: int, colour: tuple[int, int, int] = (40, 90, 160)
) -> InputImage:
    """An init image as the server edge hands it to backends: RGB, re-encoded as PNG."""
    from PIL import Image

    return _input(Image.new("RGB", (width, height), colour))


def mask_image(width: int, height: int, box: tuple[int, int, int, int]) -> InputImage:
    """Our mask convention: mode L, white (255) inside `box` = repaint, black elsewhere, with
    one grey pixel (feathering) at the box's corner."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (width, height), 0)
    ImageDraw.Draw(img).rectangle(box, fill=255)
    img.putpixel((box[0], box[1]), 128)
    return _input(img)
