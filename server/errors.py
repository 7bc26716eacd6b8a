"""The service's exception root and its stable codes; HTTP and the CLI map these in one place."""

from __future__ import annotations


class ImagegenError(Exception):
    """Root of every error the service raises to its callers (CLI, HTTP, batch)."""

    code = "server_error"
    http_status = 500
    error_type = "server_error"
    # CLI exit code: 2 for bad input / blocked prompt, 1 for failures.
    exit_code = 1

    def __init__(self, message: str, *, param: str | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        # A failure the next model of a fallback chain may recover from (timeouts, 5xx,
        # 429 after retries, an open circuit, a full local queue).
        self.transient = transient


class InvalidRequestError(ImagegenError):
    code = "invalid_request"
    http_status = 400
    error_type = "invalid_request_error"
    exit_code = 2


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


class ModelNotFoundError(ImagegenError):
    code = "model_not_found"
    http_status = 404
    error_type = "invalid_request_error"
    exit_code = 2

    @classmethod
    def for_model(cls, name: str) -> ModelNotFoundError:
        return cls(
            f"model '{name}' is not in the catalogue; `imagegen models` or GET /v1/models "
            "lists the available ones",
            param="model",
        )


class ModelUnavailableError(ImagegenError):
    code = "model_unavailable"
    http_status = 503
    error_type = "server_error"


class LocalOnlyError(InvalidRequestError):
    code = "local_only"
    http_status = 403


class RateLimitedError(ImagegenError):
    code = "rate_limited"
    http_status = 429
    error_type = "rate_limit_error"

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
    code = "queue_full"


class BudgetExhaustedError(RateLimitedError):
    code = "budget_exhausted"


class ProviderError(ImagegenError):
    code = "provider_error"
    http_status = 502


class ProviderAuthError(ProviderError):
    code = "provider_auth_failed"


class NotReadyError(ImagegenError):
    code = "not_ready"
    http_status = 503


class CancelledError(ImagegenError):
    code = "cancelled"
    http_status = 499


class GenerationFailedError(ImagegenError):
    code = "generation_failed"
    http_status = 500
