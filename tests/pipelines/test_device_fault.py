"""Device faults are sticky and internal error text stays in the log: the device worker over a
small Runner that fails on demand (the one place a fake forces a failure), plus the detector
that tells a broken device from an out-of-memory or an ordinary bug."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from typing import Any

import pytest

from models.base import (
    BackendError,
    DeviceFaultError,
    GeneratedImage,
    GenerationParams,
    OutOfMemoryError,
)
from models.local.pipeline import BatchOutput, StepHook
from models.local.runtime import describe_device_fault, is_fatal_device_error
from models.local.worker import GENERATION_FAILED, Demand, DeviceWorker, WorkItem

ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"
DEADLINE_S = 30


class ScriptedRunner:
    """A Runner whose calls raise the given exceptions in turn (None: succeed), each call
    optionally held at a gate until the test releases it."""

    def __init__(self, *outcomes: BaseException | None, gate: threading.Event | None = None):
        self.outcomes = list(outcomes)
        self.gate = gate
        self.entered = threading.Event()
        self.calls: list[list[str]] = []
        self.low_memory: list[bool] = []

    def load(self) -> None:
        pass

    def interrupt(self) -> None:
        pass

    def run_batch(
        self,
        batch: list[GenerationParams],
        *,
        precise: bool = False,
        on_step: StepHook | None = None,
        low_memory: bool = False,
    ) -> Any:
        self.calls.append([params.prompt for params in batch])
        self.low_memory.append(low_memory)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(DEADLINE_S)
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome
        images = [
            [GeneratedImage(data=b"png", seed=seed, width=8, height=8) for seed in p.image_seeds()]
            for p in batch
        ]
        return BatchOutput(images=images, device_seconds=0.01)


def _params(prompt: str, *, steps: int = 2) -> GenerationParams:
    return GenerationParams(
        prompt=prompt, model="tiny-sdxl", width=64, height=64, n=1, seed=1, steps=steps
    )


def _error(item: WorkItem) -> BaseException:
    error = item.future.exception(timeout=DEADLINE_S)
    assert error is not None
    return error


def test_a_cuda_error_fails_all_work_refuses_more_and_tells_the_owner(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = threading.Event()
    runner = ScriptedRunner(RuntimeError(ILLEGAL_ADDRESS), gate=gate)
    faults: list[str] = []
    worker = DeviceWorker(batch_window_s=0, on_fault=faults.append)
    try:
        running = worker.submit(WorkItem(params=_params("running"), runner=runner))
        assert runner.entered.wait(DEADLINE_S)
        # Queued behind the failing call, with another key so it would run on its own.
        queued = worker.submit(WorkItem(params=_params("queued", steps=3), runner=runner))
        control = worker.call(lambda: "never runs")
        with caplog.at_level(logging.ERROR, logger="models.local.worker"):
            gate.set()
            errors = [_error(running), _error(queued), control.exception(timeout=DEADLINE_S)]

        message = (
            "the device failed (illegal memory access (RuntimeError)); the server must be restarted"
        )
        for error in errors:
            assert isinstance(error, DeviceFaultError)
            assert error.message == message and error.code == "device_fault"
        assert runner.calls == [["running"]]  # the queued request never reached the device
        assert worker.fault == "illegal memory access (RuntimeError)"
        assert faults == [message]
        # The log has the exception itself, with its traceback.
        [record] = [r for r in caplog.records if r.exc_info]
        assert ILLEGAL_ADDRESS in caplog.text and "Traceback" in caplog.text
        assert record.levelno == logging.CRITICAL

        # From now on everything is refused at once, with the same words.
        with pytest.raises(DeviceFaultError, match="the server must be restarted"):
            worker.submit(WorkItem(params=_params("after"), runner=runner))
        with pytest.raises(DeviceFaultError):
            worker.admit(Demand("tiny-sdxl", 1))
        assert isinstance(worker.call(lambda: None).exception(timeout=0), DeviceFaultError)
        assert runner.calls == [["running"]]
    finally:
        worker.stop()


def test_a_cuda_error_while_loading_faults_the_worker_too() -> None:
    faults: list[str] = []
    worker = DeviceWorker(on_fault=faults.append)
    try:

        def load_onto_a_broken_device() -> None:
            raise RuntimeError("CUDA error: unspecified launch failure")

        error = worker.call(load_onto_a_broken_device).exception(timeout=DEADLINE_S)
        assert isinstance(error, DeviceFaultError)
        assert worker.fault == "unspecified launch failure (RuntimeError)"
        assert len(faults) == 1
        with pytest.raises(DeviceFaultError):
            worker.submit(WorkItem(params=_params("after"), runner=ScriptedRunner()))
    finally:
        worker.stop()


@pytest.mark.parametrize(
    "failure",
    [
        # What torch raises when the allocator gives up: a RuntimeError that mentions CUDA.
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        ValueError("an ordinary bug"),
    ],
    ids=["torch-oom-text", "ordinary"],
)
def test_out_of_memory_and_ordinary_errors_do_not_fault_the_worker(
    failure: BaseException,
) -> None:
    faults: list[str] = []
    runner = ScriptedRunner(failure, None)
    worker = DeviceWorker(batch_window_s=0, on_fault=faults.append)
    try:
        failed = worker.submit(WorkItem(params=_params("fails"), runner=runner))
        error = _error(failed)
        assert isinstance(error, BackendError) and not isinstance(error, DeviceFaultError)
        served = worker.submit(WorkItem(params=_params("served"), runner=runner))
        assert served.future.result(timeout=DEADLINE_S).images[0].seed == 1
        assert worker.fault is None and faults == []
    finally:
        worker.stop()


OOM = OutOfMemoryError("out of GPU memory for 2 image(s) at 64x64; lower n or the size")


def _held(worker: DeviceWorker, runner: ScriptedRunner, prompts: list[str]) -> list[WorkItem]:
    """Submit `prompts` while the worker is busy, so they gather into one batch."""
    release = threading.Event()
    worker.call(release.wait)
    items = [worker.submit(WorkItem(params=_params(p), runner=runner)) for p in prompts]
    release.set()
    return items


def test_out_of_memory_is_retried_split_in_half() -> None:
    runner = ScriptedRunner(OOM, None, None)
    worker = DeviceWorker(batch_window_s=0.05)
    try:
        items = _held(worker, runner, ["a", "b"])
        for item in items:
            assert item.future.result(timeout=DEADLINE_S).images
        assert runner.calls == [["a", "b"], ["a"], ["b"]]
        assert runner.low_memory == [False, False, False]
    finally:
        worker.stop()


def test_then_with_vae_tiling_then_it_fails_retryably_and_the_worker_goes_on() -> None:
    worker = DeviceWorker(batch_window_s=0)
    try:
        # Two requests out of memory every time: whole, halves, halves in tiles, then fail.
        always = ScriptedRunner(OOM, OOM, OOM, OOM, OOM, OOM)
        items = _held(worker, always, ["x", "y"])
        for item in items:
            error = _error(item)
            assert isinstance(error, OutOfMemoryError)
            assert "split in half and with VAE tiling" in error.message
            assert error.retry_after_s is not None and error.retry_after_s >= 1
        assert always.calls == [["x", "y"], ["x"], ["x"]]
        assert always.low_memory == [False, False, True]
        # One request: nothing to split, so the second try decodes in tiles.
        runner = ScriptedRunner(OOM, None)
        served = worker.submit(WorkItem(params=_params("a"), runner=runner))
        assert served.future.result(timeout=DEADLINE_S).images
        assert runner.low_memory == [False, True]
        # The worker is fine: the next ten are served.
        for i in range(10):
            item = worker.submit(WorkItem(params=_params(f"next {i}"), runner=runner))
            assert item.future.result(timeout=DEADLINE_S).images
        assert worker.fault is None
    finally:
        worker.stop()


def test_unexpected_error_text_is_logged_never_returned(caplog: pytest.LogCaptureFixture) -> None:
    runner = ScriptedRunner(ValueError("secret internal detail at /srv/weights/unet"))
    worker = DeviceWorker(batch_window_s=0)
    try:
        with caplog.at_level(logging.ERROR, logger="models.local.worker"):
            error = _error(worker.submit(WorkItem(params=_params("fails"), runner=runner)))
        assert isinstance(error, BackendError)
        assert error.message == GENERATION_FAILED
        assert "secret" not in str(error) and "ValueError" not in str(error)
        assert "secret internal detail" in caplog.text and "Traceback" in caplog.text
    finally:
        worker.stop()


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        (ILLEGAL_ADDRESS, "illegal memory access"),
        ("CUDA error: device-side assert triggered", "device-side assert triggered"),
        ("CUDA error: unspecified launch failure", "unspecified launch failure"),
        ("CUDA error: uncorrectable ECC error encountered", "ECC error"),
        (
            "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`",
            "CUBLAS_STATUS_",
        ),
        ("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR", "cuDNN error"),
        ("CUDA error: misaligned address", "CUDA error"),
    ],
)
def test_fatal_device_errors_are_recognised(text: str, fault: str) -> None:
    assert is_fatal_device_error(RuntimeError(text))
    assert describe_device_fault(RuntimeError(text)) == f"{fault} (RuntimeError)"


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("Expected all tensors to be on the same device"),
        ValueError("CUDA error: an illegal memory access was encountered"),  # not torch's type
        OutOfMemoryError("out of GPU memory"),
        KeyboardInterrupt(),
    ],
)
def test_other_errors_are_not_device_faults(exc: BaseException) -> None:
    assert not is_fatal_device_error(exc)


def test_torch_error_types_are_told_apart() -> None:
    torch = pytest.importorskip("torch")
    accelerator_error = getattr(torch, "AcceleratorError", RuntimeError)
    assert is_fatal_device_error(accelerator_error(ILLEGAL_ADDRESS))
    assert not is_fatal_device_error(torch.cuda.OutOfMemoryError("CUDA error: an illegal"))


def test_recognising_a_fault_imports_no_torch() -> None:
    """The worker checks every failure; that check must stay cheap and CPU-build safe."""
    code = (
        "import sys\n"
        "from models.local.worker import DeviceWorker\n"
        "from models.local.runtime import is_fatal_device_error\n"
        f"assert is_fatal_device_error(RuntimeError({ILLEGAL_ADDRESS!r}))\n"
        "assert not is_fatal_device_error(ValueError('x'))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
