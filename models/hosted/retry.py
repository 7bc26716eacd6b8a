"""Shared HTTP behaviour of hosted backends: timeouts, retries honouring Retry-After, error mapping.

Every hosted backend sends through `HostedHTTP` (or, for the OpenAI SDK, through
`with_retries` directly), so the same statuses retry the same way everywhere:

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

import asyncio
import base64
import binascii
import email.utils
import io
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from models.base import (
    AuthError,
    BackendError,
    ContentFilteredError,
    GeneratedImage,
    InvalidParamsError,
    OutputFormat,
    TransientBackendError,
)
from models.hosted.config import ProviderConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
SleepFn = Callable[[float], Awaitable[None]]
# Maps a provider-specific non-2xx answer to an error, or None to fall through to the generic
# mapping. Runs before retries are considered, so a moderation 403 is never retried.
ErrorHook = Callable[[httpx.Response], BackendError | None]

_NOT_RETRIED_5XX = frozenset({501, 505})
_MESSAGE_LIMIT = 300


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


# --------------------------------------------------------------------------------------------
# Error texts
# --------------------------------------------------------------------------------------------


def scrub(text: str, config: ProviderConfig) -> str:
    """Remove the key from provider text we quote (some providers echo part of it back)."""
    key = config.api_key_value()
    if key:
        text = text.replace(key, "***")
    return text


def provider_message(response: httpx.Response) -> str:
    """The human part of an error body, whatever the provider's envelope."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text.strip()[:_MESSAGE_LIMIT]
    return _message_from_body(body)[:_MESSAGE_LIMIT]


def _message_from_body(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):  # OpenAI envelope
            return str(error["message"])
        if isinstance(body.get("errors"), list):  # Stability
            return "; ".join(str(e) for e in body["errors"])
        detail = body.get("detail")
        if isinstance(detail, list):  # FastAPI / BFL 422
            return "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}"
                if isinstance(d, dict)
                else str(d)
                for d in detail
            )
        for name in ("message", "description", "detail", "name"):
            if body.get(name):
                return str(body[name])
    return str(body)


def auth_failure(config: ProviderConfig, status: int | None = None) -> AuthError:
    if config.api_key is None:
        detail = f"no API key is configured{f' ({status})' if status else ''}"
    else:
        detail = f"the API key was rejected ({status})"
    return AuthError(
        f"{config.provider}: {detail}; set {config.key_setting}", provider=config.provider
    )


def generic_error(config: ProviderConfig, response: httpx.Response) -> BackendError:
    """What a non-2xx answer means when no provider-specific rule matched."""
    status = response.status_code
    provider = config.provider
    message = scrub(provider_message(response), config)
    if status in (401, 403):
        return auth_failure(config, status)
    if status == 402:
        return BackendError(
            f"{provider}: payment required (402): {message}; add credits to the account",
            provider=provider,
        )
    if status == 404:
        return BackendError(
            f"{provider}: {response.request.method} {response.request.url.path} answered 404 "
            f"({message}); check providers.{provider}.base_url",
            provider=provider,
        )
    if 400 <= status < 500:
        return InvalidParamsError(
            f"{provider} rejected the request ({status}): {message}", provider=provider
        )
    return BackendError(f"{provider}: unexpected answer {status}: {message}", provider=provider)


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class HostedHTTP:
    """One httpx.AsyncClient per backend, opened lazily on the running loop."""

    def __init__(
        self,
        config: ProviderConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: SleepFn | None = None,
    ) -> None:
        self.config = config
        self.policy = RetryPolicy.from_config(config)
        self.sleep: SleepFn = sleep or asyncio.sleep
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        # A client's connections belong to the loop that opened them; a caller on another loop
        # (each `asyncio.run` of the CLI or a test) gets a fresh client.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client.is_closed or self._loop is not loop:
            self._loop = loop
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(self.config.timeout_s),
                follow_redirects=True,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None

    async def send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        files: Any = None,
        on_error: ErrorHook | None = None,
    ) -> httpx.Response:
        """Send with retries; return the 2xx response or raise a BackendError."""
        provider = self.config.provider

        async def attempt() -> httpx.Response:
            try:
                response = await self.client.request(
                    method, url, headers=headers, json=json, files=files
                )
            except httpx.TimeoutException:
                raise Retryable(f"no answer within {self.config.timeout_s:g} s") from None
            except httpx.TransportError as exc:
                raise Retryable(f"connection failed ({type(exc).__name__})") from None
            if response.is_success:
                return response
            if on_error is not None:
                mapped = on_error(response)
                if mapped is not None:
                    raise mapped
            if is_retryable_status(response.status_code):
                message = scrub(provider_message(response), self.config)
                raise Retryable(
                    f"{response.status_code} {response.reason_phrase}"
                    + (f": {message}" if message else ""),
                    parse_retry_after(response.headers),
                )
            raise generic_error(self.config, response)

        return await with_retries(
            attempt, provider=provider, policy=self.policy, sleep=self.sleep, what=what
        )

    async def send_json(
        self,
        method: str,
        url: str,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        files: Any = None,
        on_error: ErrorHook | None = None,
    ) -> dict[str, Any]:
        response = await self.send(
            method, url, what=what, headers=headers, json=json, files=files, on_error=on_error
        )
        return json_object(response, self.config.provider, what)

    async def download(
        self, url: str, *, what: str = "image download", headers: Mapping[str, str] | None = None
    ) -> bytes:
        """Fetch result bytes (signed URLs: no credentials are sent unless `headers` says so)."""
        response = await self.send("GET", url, what=what, headers=headers)
        return response.content


def json_object(response: httpx.Response, provider: str, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BackendError(
            f"{provider}: {what} answered {response.status_code} without a JSON object",
            provider=provider,
        )
    return body


def same_site(url: str, base_url: str) -> bool:
    """Whether `url` belongs to the provider behind `base_url` (same host, or the same
    registrable domain, as with BFL's regional polling hosts). Credentials go only there."""
    host = (urlsplit(url).hostname or "").lower()
    base = (urlsplit(base_url).hostname or "").lower()
    if not host or not base:
        return False
    if host == base:
        return True
    labels = base.split(".")
    if len(labels) < 2 or base.replace(".", "").isdigit():
        return False
    site = ".".join(labels[-2:])
    return host == site or host.endswith("." + site)


# --------------------------------------------------------------------------------------------
# Result payloads
# --------------------------------------------------------------------------------------------

_PIL_FORMATS: Mapping[str, OutputFormat] = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def decode_b64(text: Any, provider: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise BackendError(f"{provider}: the response carries no base64 image", provider=provider)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BackendError(
            f"{provider}: the response's image is not valid base64", provider=provider
        ) from None


def to_image(data: bytes, *, provider: str, seed: int | None) -> GeneratedImage:
    """Read the real size and format from the bytes (providers do not always honour the
    requested size: aspect-ratio-only APIs, Midjourney grids)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            fmt = _PIL_FORMATS.get(img.format or "")
    except (UnidentifiedImageError, OSError):
        raise BackendError(
            f"{provider}: the provider returned data that is not an image", provider=provider
        ) from None
    if fmt is None:
        raise BackendError(
            f"{provider}: the provider returned an image in an unsupported format",
            provider=provider,
        )
    return GeneratedImage(data=data, seed=seed, width=width, height=height, format=fmt)


@dataclass(frozen=True)
class Piece:
    """One image from one provider call, with what that call cost (None: not known)."""

    image: GeneratedImage
    cost_usd: float | None = None


async def gather_pieces(provider: str, jobs: Sequence[Awaitable[Piece]]) -> list[Piece]:
    """Run one provider call per image concurrently. If any was filtered, raise one
    ContentFilteredError carrying everything that was charged across all of them."""
    results = await asyncio.gather(*jobs, return_exceptions=True)
    pieces = [r for r in results if isinstance(r, Piece)]
    errors = [r for r in results if isinstance(r, BaseException)]
    filtered = [e for e in errors if isinstance(e, ContentFilteredError)]
    if filtered:
        charged = sum(p.cost_usd or 0.0 for p in pieces) + sum(e.charged_usd for e in filtered)
        raise ContentFilteredError(filtered[0].message, provider=provider, charged_usd=charged)
    for error in errors:
        raise error
    return pieces


def total_cost(pieces: Sequence[Piece]) -> float | None:
    if any(p.cost_usd is None for p in pieces):
        return None
    return sum(p.cost_usd or 0.0 for p in pieces)
