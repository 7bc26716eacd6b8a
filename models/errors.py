"""The exception hierarchy at the bottom of imagegen: one root (`ImagegenError`), the errors a
backend raises under `BackendError`, and (in server/errors.py) the service's under its own
branch of the same root. Torch-free, like all of models/ at import time.

    ImagegenError
    ├── BackendError            models/: what a backend raises
    │   ├── InvalidParamsError ── PromptTooLongError
    │   ├── ModelUnavailableError, ContentFilteredError, AuthError
    │   ├── TransientBackendError ── OutOfMemoryError, QueueFullError
    │   └── DeviceFaultError, WorkCancelledError
    └── ServiceError            server/errors.py: what callers of the service see
"""

from __future__ import annotations


class ImagegenError(Exception):
    """The root of every error imagegen raises on purpose, backend and service alike.

    `message` is written for the client: it names the field (`param`) and the fix, and never
    carries internal exception text. `code` is stable and machine-readable. How an error is
    shown is decided at the edges, each with one table keyed by class: the HTTP status and
    OpenAI error type in server/http/errors.py, the exit code in server/cli.py."""

    code = "server_error"
    # Whether the next model of a fallback chain may recover from it (timeouts, 5xx, 429
    # after retries, an open circuit, a full local queue).
    transient = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BackendError(ImagegenError):
    """Root of every error a backend raises (models/); the service maps each to one of its
    own (server/errors.py) before a caller sees it."""

    code = "backend_error"

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        param: str | None = None,
        charged_usd: float = 0.0,
    ) -> None:
        super().__init__(message, param=param)
        self.provider = provider
        # What the provider billed before the failure (images of an n>1 request already
        # paid for, a charged moderation): the service books it, so nothing paid is lost.
        self.charged_usd = charged_usd


class InvalidParamsError(BackendError):
    """A parameter this backend cannot accept; `param` names the field."""

    code = "invalid_request"


class PromptTooLongError(InvalidParamsError):
    code = "prompt_too_long"


class ModelUnavailableError(BackendError):
    """The model's weights cannot be loaded (missing folder, offline hub, broken checkpoint)."""

    code = "model_unavailable"


class ContentFilteredError(BackendError):
    """The provider refused or filtered the content. Never retried, never sent to a fallback."""

    code = "content_filtered"

    def __init__(self, message: str, *, provider: str = "", charged_usd: float = 0.0) -> None:
        super().__init__(message, provider=provider, charged_usd=charged_usd)


class AuthError(BackendError):
    code = "provider_auth_failed"


class TransientBackendError(BackendError):
    """Timeouts, 5xx, 429 after retries, open circuits: a fallback may serve the request."""

    code = "provider_unavailable"
    transient = True


class OutOfMemoryError(TransientBackendError):
    """The device ran out of memory for the work (after the worker's retries, where it says
    so); `retry_after_s` is when the device should have room again, where estimated."""

    code = "out_of_memory"

    def __init__(
        self, message: str, *, retry_after_s: int | None = None, provider: str = "local"
    ) -> None:
        super().__init__(message, provider=provider)
        self.retry_after_s = retry_after_s


class QueueFullError(TransientBackendError):
    """The device queue is full; `retry_after_s` is estimated from recent throughput."""

    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int, provider: str = "local") -> None:
        super().__init__(message, provider=provider)
        self.retry_after_s = retry_after_s


class DeviceFaultError(BackendError):
    """The device is in a state no retry recovers from (a CUDA error other than out-of-memory:
    an illegal address, a lost device, an ECC fault). The worker stops taking work; the server
    reports not ready and exits so that a supervisor restarts the process."""

    code = "device_fault"


class WorkCancelledError(BackendError):
    """The work was cancelled (its caller went away, or the server is shutting down). Named
    apart from asyncio.CancelledError and the service's CancelledError on purpose."""

    code = "cancelled"
