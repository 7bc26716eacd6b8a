"""The retry contract of hosted backends: what is retried, how long to wait, when to give up.

Every hosted backend sends through `HostedHTTP` (models.hosted.client) or, for the OpenAI SDK,
through `with_retries` directly, so the same statuses retry the same way everywhere:

- 408, 429, 5xx (not 501/505), timeouts and connection errors are retried up to
  `max_retries` times. The wait is the server's `retry-after-ms` / `Retry-After` (seconds or
  an HTTP date) when given, else `backoff_base_s * 2**attempt`. A server-directed wait longer
  than `retry_cap_s` is not sat through: the call fails at once so a fallback can serve it.
- After the last retry: `TransientBackendError`.
- 401 and 403: `AuthError` naming the provider and the setting to fix, never the key.
- Provider-specific answers (moderation forms, retired models) are mapped first by the
  backend's `on_error` hook.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from models.base import TransientBackendError
from models.hosted.config import ProviderConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
SleepFn = Callable[[float], Awaitable[None]]

_NOT_RETRIED_5XX = frozenset({501, 505})


def is_retryable_status(status: int) -> bool:
    return status in (408, 429) or (status >= 500 and status not in _NOT_RETRIED_5XX)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, else `Retry-After` (delta-seconds or HTTP date).
    None when absent or unreadable; a date in the past gives 0."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lowered.get(name)
        if value is None:
            continue
        try:
            seconds = float(value.strip()) / divisor
        except ValueError:
            continue
        if math.isfinite(seconds):
            return max(0.0, seconds)
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


class Retryable(Exception):
    """Raised inside one attempt to ask `with_retries` for another; never leaves this module's
    callers (it becomes TransientBackendError after the last attempt)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    backoff_base_s: float
    retry_cap_s: float

    @classmethod
    def from_config(cls, config: ProviderConfig) -> RetryPolicy:
        return cls(config.max_retries, config.backoff_base_s, config.retry_cap_s)

    def backoff(self, attempt: int) -> float:
        """Wait before retry `attempt + 1` when the server named none."""
        return min(self.backoff_base_s * 2.0 ** min(attempt, 30), max(self.retry_cap_s, 0.0))


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    provider: str,
    policy: RetryPolicy,
    sleep: SleepFn,
    what: str,
) -> T:
    """Run `attempt` until it returns, raises a BackendError, or runs out of retries."""
    tries = 0
    while True:
        try:
            return await attempt()
        except Retryable as exc:
            tries += 1
            if exc.retry_after is not None and exc.retry_after > policy.retry_cap_s:
                raise TransientBackendError(
                    f"{provider}: {what} failed: {exc.reason}; the provider asked to wait "
                    f"{exc.retry_after:g} s, longer than providers.{provider}.retry_cap_s "
                    f"({policy.retry_cap_s:g} s)",
                    provider=provider,
                ) from None
            if tries > policy.max_retries:
                raise TransientBackendError(
                    f"{provider}: {what} failed after {tries} attempt(s): {exc.reason}",
                    provider=provider,
                ) from None
            delay = exc.retry_after if exc.retry_after is not None else policy.backoff(tries - 1)
            log.warning(
                "%s: %s: %s; retry %d of %d in %.2f s",
                provider,
                what,
                exc.reason,
                tries,
                policy.max_retries,
                delay,
            )
            await sleep(delay)
