"""A live server for end-to-end tests: `create_app` under uvicorn on 127.0.0.1 (a free port,
bound before the thread starts) in a background thread, ready once /readyz says so."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.base import GenerationParams
from models.catalogue import Catalogue
from models.local.pipeline import StepHook
from models.local.worker import Runner
from server.http import create_app
from server.http.state import AppState
from server.registry import BackendRegistry
from server.service import ImageService
from server.settings import Settings

API_KEY = "test-key-0123456789"


def fresh_data_dir(parent: Path, tiny_models_dir: Path | None = None) -> Path:
    """A new data dir under `parent`; with conftest's `tiny_models_dir` the built tiny models
    are copied in (loading stays the normal path), otherwise they build on first use."""
    parent.mkdir(parents=True, exist_ok=True)
    target = Path(os.path.join(parent, f"data-{os.urandom(4).hex()}"))
    if tiny_models_dir is not None and (tiny_models_dir / "models").is_dir():
        shutil.copytree(tiny_models_dir / "models", target / "models")
    return target


def tiny_settings(data_dir: Path, **server: Any) -> Settings:
    """Settings for a test server: a fresh data dir, tiny-sdxl loaded at start, and any
    `local` overrides passed as local={...}."""
    local = server.pop("local", {})
    top = server.pop("top", {})
    server.setdefault("models", ["tiny-sdxl"])
    return Settings(data_dir=data_dir, server=server, local=local, **top)


@dataclass
class LiveServer:
    url: str
    app: Any
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def state(self) -> AppState:
        state: AppState = self.app.state.imagegen
        return state

    @property
    def service(self) -> ImageService:
        return self.state.service

    def client(self, api_key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        kwargs.setdefault("timeout", 60.0)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def stop(self) -> None:
        self.state.readiness.draining = True
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(
    settings: Settings,
    *,
    service: ImageService | None = None,
    ready_timeout: float = 90.0,
    wait_ready: bool = True,
) -> LiveServer:
    app = create_app(settings, service=service)
    # IPPROTO_TCP spelled out: asyncio only sets TCP_NODELAY on sockets whose proto says TCP,
    # and without it every request pays Nagle + delayed ACK (40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="test-uvicorn"
    )
    thread.start()
    live = LiveServer(url=f"http://127.0.0.1:{port}", app=app, server=server, thread=thread)
    deadline = time.monotonic() + ready_timeout
    probe = "/readyz" if wait_ready else "/livez"
    with httpx.Client(base_url=live.url, timeout=5.0) as client:
        while True:
            try:
                if client.get(probe).status_code == 200:
                    return live
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                live.stop()
                raise RuntimeError(f"test server did not become ready ({probe})")
            time.sleep(0.05)


@contextmanager
def live_server(settings: Settings, **kwargs: Any) -> Iterator[LiveServer]:
    live = start_server(settings, **kwargs)
    try:
        yield live
    finally:
        live.stop()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class DeviceBatch:
    """One pipeline call as the device saw it."""

    prompts: list[str]
    images: int = 0  # the images of the call (n summed)
    steps: int = 0  # the last step it reported
    previews: int = 0  # the live previews rendered (one per image per step that showed one)
    low_memory: bool = False  # the worker's last try after running out of memory (VAE tiles)
    threads: int = 0  # torch's intra-op threads on the worker's thread
    # When the call began and returned (time.monotonic), to show two devices busy at once.
    started_at: float = 0.0
    ended_at: float = 0.0


class WatchedRunner:
    """The real pipeline runner, recording what reaches the device: the prompts of every batch
    and the last step each one reported. While `gate` is clear, a batch that starts holds
    after its first step until it is set, and `holding` is set (the one place these tests
    force the device to block: a test acts while a batch is mid-run, whatever the host's speed).
    While `failing` is set, every batch raises it instead of running (the one way to run a CPU
    out of GPU memory, or into a device fault), or only the next `failures` batches where that
    is set; the batch is still recorded. While
    `peak_per_image` is set, each call reports that peak working memory per image, as CUDA's
    allocator counters would (a CPU has none).
    Injected through BackendRegistry(wrap_runner=...); see `watched_service`."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.failing: BaseException | None = None
        self.failures: int | None = None
        self.peak_per_image: int | None = None
        self.batches: list[DeviceBatch] = []
        self.gate = threading.Event()
        self.gate.set()
        self.holding = threading.Event()

    def hold(self) -> None:
        """Hold the next batch to start after its first step (until `release`)."""
        self.holding.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    @property
    def prompts(self) -> list[str]:
        return [prompt for batch in self.batches for prompt in batch.prompts]

    def load(self) -> None:
        self.inner.load()

    def interrupt(self) -> None:
        self.inner.interrupt()

    def run_batch(
        self,
        batch: list[GenerationParams],
        *,
        precise: bool = False,
        on_step: StepHook | None = None,
        low_memory: bool = False,
    ) -> Any:
        seen = DeviceBatch(
            prompts=[params.prompt for params in batch],
            images=sum(params.n for params in batch),
            low_memory=low_memory,
            threads=_torch_threads(),
            started_at=time.monotonic(),
        )
        self.batches.append(seen)
        if self.failing is not None:
            failing = self.failing
            if self.failures is not None:
                self.failures -= 1
                if self.failures <= 0:
                    self.failing = self.failures = None
            raise failing

        def counted(step: int, total: int, render: Callable[[int], Any]) -> None:
            seen.steps = step

            def rendered(index: int) -> Any:
                seen.previews += 1
                return render(index)

            if on_step is not None:
                on_step(step, total, rendered)
            if step == 1 and not self.gate.is_set():
                self.holding.set()
                self.gate.wait()

        try:
            output = self.inner.run_batch(
                batch, precise=precise, on_step=counted, low_memory=low_memory
            )
        finally:
            seen.ended_at = time.monotonic()
        if self.peak_per_image is not None:
            output.peak_bytes = self.peak_per_image * seen.images
        return output


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def watched_service(settings: Settings) -> tuple[ImageService, list[WatchedRunner]]:
    """A service whose local runners are WatchedRunners (one per local model, created with its
    backend on first use)."""
    runners: list[WatchedRunner] = []

    def watch(inner: Runner) -> Runner:
        runners.append(WatchedRunner(inner))
        return runners[-1]

    registry = BackendRegistry(settings, Catalogue.load(settings.models), wrap_runner=watch)
    return ImageService(settings, registry=registry), runners


@contextmanager
def watched_server(settings: Settings) -> Iterator[tuple[LiveServer, WatchedRunner]]:
    """A live server of `watched_service`, with the WatchedRunner of the one local model its
    settings load at start."""
    service, runners = watched_service(settings)
    try:
        with live_server(settings, service=service) as live:
            (runner,) = runners
            yield live, runner
    finally:
        service.close()
