"""The service's errors: what callers of the ImageService (CLI, HTTP, batch) see, under the one
root in models/errors.py. How each is shown is the edges' business: the HTTP status and
OpenAI error type in server/http/errors.py, the exit code in server/cli.py."""

from __future__ import annotations

from models.errors import ImagegenError

__all__ = [
    "BudgetExhaustedError",
    "CancelledError",
    "ContentFilteredError",
    "DeviceFaultError",
    "GenerationFailedError",
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
    "RateLimitedError",
    "ServiceError",
]


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


class ProviderError(ServiceError):
    code = "provider_error"


class ProviderAuthError(ProviderError):
    code = "provider_auth_failed"


class NotReadyError(ServiceError):
    code = "not_ready"


class DeviceFaultError(ServiceError):
    """The local device failed in a way no retry recovers from; the process must restart."""

    code = "device_fault"


class CancelledError(ServiceError):
    """The request was cancelled (its client went away). Not asyncio.CancelledError."""

    code = "cancelled"


class GenerationFailedError(ServiceError):
    code = "generation_failed"
