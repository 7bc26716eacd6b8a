"""The device worker's gathering decision, on the real tiny-sdxl pipeline: requests that come
together share a pipeline call, and a request after a quiet spell does not wait for company
that was only there before."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from models.base import GenerationParams, WorkCancelledError
from models.catalogue import Catalogue
from models.local.pipeline import PipelineRunner, RuntimeOptions
from models.local.worker import DeviceWorker, WorkItem

WINDOW_S = 1.0


class Waits:
    """The worker's observer: queue waits per pipeline call."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []

    def batch_done(
        self, model: str, images: int, device_seconds: float, queue_waits: list[float]
    ) -> None:
        self.batches.append(queue_waits)

    def queue_depth(self, device: str, images: int) -> None:
        pass


def _params(seed: int) -> GenerationParams:
    return GenerationParams(
        prompt="a lighthouse at dusk",
        model="tiny-sdxl",
        width=64,
        height=64,
        n=1,
        seed=seed,
        steps=2,
        guidance_scale=5.0,
        scheduler="euler",
    )


def test_request_after_a_quiet_spell_does_not_wait_for_the_last_burst(data_dir: Path) -> None:
    spec = Catalogue.load([]).get("tiny-sdxl")
    assert spec is not None
    runner = PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions())
    waits = Waits()
    worker = DeviceWorker(batch_window_s=WINDOW_S, observer=waits)
    try:
        worker.call(runner.load).result(timeout=120)
        # Two requests queued behind a held worker run as one pipeline call.
        release = threading.Event()
        worker.call(release.wait)
        pair = [worker.submit(WorkItem(params=_params(s), runner=runner)) for s in (1, 2)]
        release.set()
        for item in pair:
            item.future.result(timeout=120)
        assert worker.pipeline_calls == 1

        # Longer than the window after that shared batch: a lone request starts at once.
        # (Before, the worker waited half a window for the two clients of the last batch.)
        time.sleep(WINDOW_S * 1.2)
        lone = worker.submit(WorkItem(params=_params(3), runner=runner))
        lone.future.result(timeout=120)
        assert worker.pipeline_calls == 2
        assert waits.batches[-1][0] < WINDOW_S / 4, waits.batches
    finally:
        worker.stop()


def test_a_cancelled_control_call_is_skipped_and_the_worker_lives_on() -> None:
    """A load whose caller went away cancels its future before the worker gets to it; the
    worker must skip it and keep serving (it used to die setting a cancelled future)."""
    worker = DeviceWorker()
    try:
        release = threading.Event()
        worker.call(release.wait)
        ran: list[str] = []
        abandoned = worker.call(lambda: ran.append("abandoned"))
        assert abandoned.cancel()
        release.set()
        assert worker.call(lambda: "alive").result(timeout=30) == "alive"
        assert ran == []
    finally:
        worker.stop()


class CancelsOnArrival:
    """Forces the race: the request is cancelled after the worker has made it the running
    batch but before the pipeline has started (and armed its stop flag)."""

    def __init__(self, inner: PipelineRunner, worker: DeviceWorker) -> None:
        self.inner, self.worker = inner, worker
        self.item: WorkItem | None = None
        self.steps: list[int] = []

    def load(self) -> None:
        self.inner.load()

    def interrupt(self) -> None:
        self.inner.interrupt()

    def run_batch(self, batch, *, precise=False, on_step=None, low_memory=False):  # type: ignore[no-untyped-def]
        assert self.item is not None
        self.worker.cancel(self.item)

        def counted(step: int, total: int, render: Callable[[int], Any]) -> None:
            self.steps.append(step)
            if on_step is not None:
                on_step(step, total, render)

        return self.inner.run_batch(batch, precise=precise, on_step=counted)


def test_a_cancel_during_batch_setup_still_stops_the_batch(data_dir: Path) -> None:
    """It was lost: the runner cleared its stop flag as it started, after the cancel."""
    spec = Catalogue.load([]).get("tiny-sdxl")
    assert spec is not None
    worker = DeviceWorker()
    runner = CancelsOnArrival(
        PipelineRunner(spec, data_dir=data_dir, options=RuntimeOptions()), worker
    )
    try:
        worker.call(runner.load).result(timeout=120)
        long = GenerationParams(**{**_params(4).__dict__, "steps": 12})
        runner.item = WorkItem(params=long, runner=runner)
        worker.submit(runner.item)
        with pytest.raises(WorkCancelledError):
            runner.item.future.result(timeout=120)
        assert 1 <= len(runner.steps) < 12, runner.steps
    finally:
        worker.stop()
