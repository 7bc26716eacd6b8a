"""The service's errors: what callers of the ImageService (CLI, HTTP, batch) see, under the one
root in models/errors.py, and the mapping from backend errors to them. How each is shown is the
edges' business: the HTTP status and OpenAI error type in server/http/errors.py, the exit code
in server/cli.py."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from models import errors as backend
from models.errors import ImagegenError

__all__ = [
    "BudgetExhaustedError",
    "CancelledError",
    "ContentFilteredError",
    "DeadlineExceededError",
    "DeviceFaultError",
    "GenerationFailedError",
    "ImageQuotaError",
    "ImagegenError",
    "InvalidRequestError",
    "LocalOnlyError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "NotReadyError",
    "PromptBlockedError",
    "ProviderAuthError",
    "ProviderError",
    "QueueFullError",
    "QuotaExceededError",
    "RateLimitedError",
    "RequestRateError",
    "ServiceError",
    "SpendQuotaError",
    "from_backend",
    "mapped",
]

log = logging.getLogger(__name__)


class ServiceError(ImagegenError):
    """Root of the errors the service raises to its callers."""

    def __init__(self, message: str, *, param: str | None = None, transient: bool = False) -> None:
        super().__init__(message, param=param)
        self.transient = transient


class InvalidRequestError(ServiceError):
    code = "invalid_request"


class PromptBlockedError(InvalidRequestError):
    code = "content_policy_violation"

    def __init__(self, category: str) -> None:
        super().__init__(
            f"prompt was blocked by the content policy (category: {category})", param="prompt"
        )
        self.category = category


class ContentFilteredError(InvalidRequestError):
    """The provider refused or filtered the content."""

    code = "content_filtered"


class LocalOnlyError(InvalidRequestError):
    code = "local_only"


class ModelNotFoundError(ServiceError):
    code = "model_not_found"

    @classmethod
    def for_model(cls, name: str) -> ModelNotFoundError:
        return cls(
            f"model '{name}' is not in the catalogue; `imagegen models` or GET /v1/models "
            "lists the available ones",
            param="model",
        )


class ModelUnavailableError(ServiceError):
    code = "model_unavailable"


class RateLimitedError(ServiceError):
    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int,
        param: str | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message, param=param, transient=transient)
        self.retry_after_s = retry_after_s


class QueueFullError(RateLimitedError):
    """The device queue is full: overload, not a failure (it never opens a circuit)."""

    code = "queue_full"


class BudgetExhaustedError(RateLimitedError):
    code = "budget_exhausted"


class QuotaExceededError(RateLimitedError):
    """A limit of the caller's own API key (server.api_keys), not the server's: no other
    model serves it, and the code says which limit."""


class RequestRateError(QuotaExceededError):
    code = "rate_limit_requests"


class ImageQuotaError(QuotaExceededError):
    code = "quota_images"


class SpendQuotaError(QuotaExceededError):
    code = "quota_usd"


class ProviderError(ServiceError):
    code = "provider_error"


class ProviderAuthError(ProviderError):
    code = "provider_auth_failed"


class NotReadyError(ServiceError):
    code = "not_ready"


class DeviceFaultError(ServiceError):
    """The local device failed in a way no retry recovers from; the process must restart."""

    code = "device_fault"


class OutOfMemoryError(ServiceError):
    """The device had no memory for the work, even split in half and decoding in tiles:
    retryable once the device has room (503 with Retry-After)."""

    code = "out_of_memory"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message, transient=True)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(ServiceError):
    """The request ran past its deadline (its `timeout`, X-Request-Timeout, or
    server.request_timeout_s): its work was cancelled, nothing cached or booked (504)."""

    code = "timeout"


class CancelledError(ServiceError):
    """The request was cancelled (its client went away). Not asyncio.CancelledError."""

    code = "cancelled"


class GenerationFailedError(ServiceError):
    code = "generation_failed"


@contextlib.contextmanager
def mapped() -> Iterator[None]:
    """Backend errors raised in the block leave it as service errors."""
    try:
        yield
    except backend.BackendError as exc:
        raise from_backend(exc) from None


def from_backend(exc: backend.BackendError, request_id: str = "") -> ServiceError:
    """Backend errors become service errors with the same message: backends write their
    messages for clients (field, fix), never internal exception text."""
    if isinstance(exc, backend.QueueFullError):
        return QueueFullError(exc.message, retry_after_s=exc.retry_after_s, transient=True)
    if isinstance(exc, backend.ContentFilteredError):
        return ContentFilteredError(exc.message, param="prompt")
    if isinstance(exc, backend.InvalidParamsError):
        return InvalidRequestError(exc.message, param=exc.param)
    if isinstance(exc, backend.ModelUnavailableError):
        return ModelUnavailableError(exc.message, param="model")
    if isinstance(exc, backend.AuthError):
        return ProviderAuthError(exc.message)
    if isinstance(exc, backend.WorkCancelledError):
        return CancelledError(exc.message)
    if isinstance(exc, backend.DeviceFaultError):
        log.error("request %s: %s", request_id or "-", exc.message)
        return DeviceFaultError(exc.message)
    if isinstance(exc, backend.OutOfMemoryError):
        return OutOfMemoryError(exc.message, retry_after_s=exc.retry_after_s or 1)
    if isinstance(exc, backend.TransientBackendError):
        return ProviderError(exc.message, transient=True)
    return GenerationFailedError(exc.message)
