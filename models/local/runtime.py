"""The host's torch runtime as local pipelines see it: which device and dtype they run on,
quiet library logging, and which device errors leave the device unusable."""

from __future__ import annotations

import os
from typing import Any

from models.base import ModelUnavailableError
from models.local.families import Family

# Texts of CUDA failures after which the CUDA context is corrupt: every later call on the
# device fails too (TGI treats them as fatal as well). Most specific first: the first that
# matches names the fault.
_FATAL_DEVICE_TEXTS = (
    "illegal memory access",
    "device-side assert triggered",
    "unspecified launch failure",
    "ECC error",
    "CUBLAS_STATUS_",
    "cuDNN error",
    "CUDA error",
)


def quiet_libraries() -> None:
    """diffusers and transformers print loading bars and advice to stderr; imagegen reports
    progress itself, so keep them to errors."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelUnavailableError(
                f"device '{requested}' was asked for but CUDA is not available; "
                "set local.device to 'auto' or 'cpu'"
            )
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def dtype_name(family: Family, device: str) -> str:
    """The family's dtype on CUDA; float32 elsewhere, where half precision is slow and poorly
    supported."""
    return family.cuda_dtype if device.startswith("cuda") else "float32"


def pick_dtype(family: Family, device: str) -> Any:
    import torch

    return getattr(torch, dtype_name(family, device))


def is_fatal_device_error(exc: BaseException) -> bool:
    """Whether `exc` is a device error no retry recovers from: out-of-memory is not (freeing
    memory recovers from it). Reads only the exception: no torch import, so it is cheap on
    any error and works on CPU-only builds."""
    return _fatal_marker(exc) is not None


def describe_device_fault(exc: BaseException) -> str:
    """A fatal device error in stable words, without its free text (which quotes addresses
    and kernels): "illegal memory access (AcceleratorError)"."""
    return f"{_fatal_marker(exc) or 'device error'} ({type(exc).__name__})"


def _fatal_marker(exc: BaseException) -> str | None:
    # torch.AcceleratorError, torch.cuda.CudaError and cuBLAS/cuDNN failures are all
    # RuntimeErrors; so is torch.cuda.OutOfMemoryError, which is not fatal.
    if not isinstance(exc, RuntimeError) or type(exc).__name__ == "OutOfMemoryError":
        return None
    text = str(exc)
    if "out of memory" in text:
        return None
    return next((marker for marker in _FATAL_DEVICE_TEXTS if marker in text), None)
