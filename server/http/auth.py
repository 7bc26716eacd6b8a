"""API keys: Bearer tokens (or the password of HTTP Basic, what A1111 clients send) checked in
constant time against stored sha256 digests, enforced for every route (present and future)
except the health probes, as ASGI middleware. Who called (the key with its limits, or the
client's address with keys off) is left in the request's state for quotas, fair queueing and
per-caller A1111 settings. Two limits are kept here, before any route runs: a key's requests
per minute, and failed key checks per client address (past which that address is refused
for the rest of the minute, a right key included, so guessing learns nothing)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from server.http.errors import dialect_of, error_response
from server.http.limits import SlidingWindow
from server.quotas import Caller, KeyLimits
from server.settings import ApiKeySettings

# Probes answer without a key: orchestrators (Kubernetes, a load balancer) hold none.
PUBLIC_PATHS = frozenset({"/livez", "/readyz"})


class ApiKeys:
    """Keys are held only as sha256 digests. A configured key is either the token itself or
    "sha256:<64 hex>" (so the config file need not hold the token), alone or in a table with
    its name and limits."""

    def __init__(self, keys: Iterable[ApiKeySettings | SecretStr]) -> None:
        entries = []
        for key in keys:
            table = key if isinstance(key, ApiKeySettings) else ApiKeySettings(key=key)
            raw = table.key.get_secret_value().strip()
            if raw.startswith("sha256:") and len(raw) == 71:
                digest = bytes.fromhex(raw.removeprefix("sha256:"))
            elif raw:
                digest = hashlib.sha256(raw.encode("utf-8")).digest()
            else:
                continue
            entries.append((digest, _caller(digest, table)))
        self._entries = tuple(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def match(self, token: str) -> Caller | None:
        """The key `token` is (its id is the key's name, or a short hex of its digest: safe
        to keep and log), or None when it is none of them."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        # Compare against every key, without stopping early: the time taken says nothing about
        # which key (or how much of one) matched.
        found: Caller | None = None
        for stored, caller in self._entries:
            if hmac.compare_digest(digest, stored):
                found = caller
        return found


def _caller(digest: bytes, table: ApiKeySettings) -> Caller:
    limits = KeyLimits(
        requests_per_minute=table.requests_per_minute,
        images_per_day=table.images_per_day,
        usd_per_day=table.usd_per_day,
    )
    return Caller("key:" + (table.name or digest.hex()[:16]), limits)


class AuthMiddleware:
    """Runs before routing, so a route added after the app was built is covered too."""

    def __init__(self, app: ASGIApp, *, keys: ApiKeys, failures_per_minute: int = 20) -> None:
        self.app = app
        self.keys = keys
        self.failures_per_minute = failures_per_minute
        self.failures = SlidingWindow()
        self.requests = SlidingWindow()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        if not self.keys.enabled:
            # Open WebUI and SillyTavern send an empty "Basic " header on every call: with keys
            # off, whatever is sent is ignored.
            _set_caller(scope, Caller(_client_address(scope)))
            await self.app(scope, receive, send)
            return
        address = _client_address(scope)
        locked = self.failures.full(address, self.failures_per_minute)
        if locked is not None:
            await self._refuse(
                scope,
                receive,
                send,
                429,
                "too_many_failed_auth",
                f"too many failed API key checks from this address; retry in {locked} s with a "
                "valid key",
                retry_after_s=locked,
            )
            return
        token = _credential(scope)
        caller = self.keys.match(token) if token is not None else None
        if caller is None:
            self.failures.record(address, self.failures_per_minute)
            await self._unauthorized(scope, receive, send, missing=token is None)
            return
        rate = caller.limits.requests_per_minute
        if rate is not None and scope["method"] == "POST":
            wait = self.requests.take(caller.id, rate)
            if wait is not None:
                await self._refuse(
                    scope,
                    receive,
                    send,
                    429,
                    "rate_limit_requests",
                    f"this API key's limit of {rate} requests per minute is reached; retry in "
                    f"{wait} s (ask the operator to raise requests_per_minute for this key)",
                    retry_after_s=wait,
                )
                return
        _set_caller(scope, caller)
        await self.app(scope, receive, send)

    async def _unauthorized(
        self, scope: Scope, receive: Receive, send: Send, *, missing: bool
    ) -> None:
        a1111 = dialect_of(scope["path"]) == "a1111"
        if missing:
            message = (
                "missing API key: send it as HTTP Basic, the key as the password (webuiapi: "
                "api.set_auth('any', KEY))"
                if a1111
                else "missing API key: send it as 'Authorization: Bearer <key>' (the OpenAI "
                "SDK does this with api_key=...)"
            )
        else:
            message = "invalid API key"
        await self._refuse(
            scope,
            receive,
            send,
            401,
            "invalid_api_key",
            message,
            headers={"WWW-Authenticate": 'Basic realm="imagegen"' if a1111 else "Bearer"},
        )

    @staticmethod
    async def _refuse(
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        code: str,
        message: str,
        *,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        response = error_response(
            status,
            message,
            code=code,
            retry_after_s=retry_after_s,
            headers=headers,
            dialect=dialect_of(scope["path"]),
        )
        await response(scope, receive, send)


def caller_of(scope: Scope) -> Caller:
    """Who made the request: the key ("key:<name or digest>", with its limits) with keys on,
    "addr:<host>" with keys off."""
    state = scope.get("state") or {}
    caller = state.get("caller")
    return caller if isinstance(caller, Caller) else Caller(_client_address(scope))


def _set_caller(scope: Scope, caller: Caller) -> None:
    scope.setdefault("state", {})["caller"] = caller


def _client_address(scope: Scope) -> str:
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:unknown"


def _credential(scope: Scope) -> str | None:
    """The key a request carries: a Bearer token, or the password of HTTP Basic ("user:key";
    credentials without a colon are the key itself). None when there is none."""
    for name, value in scope.get("headers", ()):
        if name != b"authorization":
            continue
        scheme, _, token = bytes(value).decode("latin-1").partition(" ")
        token = token.strip()
        if not token:
            return None
        if scheme.lower() == "bearer":
            return token
        if scheme.lower() == "basic":
            try:
                pair = base64.b64decode(token, validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                return None
            user, colon, password = pair.partition(":")
            key = password if colon else user
            return key or None
        return None
    return None
