"""The HTTP client of hosted backends: one httpx client per backend sending with the shared
retries (models.hosted.retry), and the mapping of provider answers to BackendErrors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from models.base import AuthError, BackendError, InvalidParamsError
from models.hosted.config import ProviderConfig
from models.hosted.retry import (
    Retryable,
    RetryPolicy,
    SleepFn,
    is_retryable_status,
    parse_retry_after,
    with_retries,
)

# Maps a provider-specific non-2xx answer to an error, or None to fall through to the generic
# mapping. Runs before retries are considered, so a moderation 403 is never retried.
ErrorHook = Callable[[httpx.Response], BackendError | None]

_MESSAGE_LIMIT = 300


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
