"""API keys: Bearer tokens (or the password of HTTP Basic, what A1111 clients send) checked in
constant time against stored sha256 digests, enforced for every route (present and future)
except the health probes, as ASGI middleware. Who called (the key, or the client's address
with keys off) is left in the request's state for per-caller A1111 settings and controls."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from server.http.errors import dialect_of, error_response

# Probes answer without a key: orchestrators (Kubernetes, a load balancer) hold none.
PUBLIC_PATHS = frozenset({"/livez", "/readyz"})


class ApiKeys:
    """Keys are held only as sha256 digests. A configured key is either the token itself or
    "sha256:<64 hex>" (so the config file need not hold the token)."""

    def __init__(self, keys: Iterable[SecretStr]) -> None:
        digests = []
        for key in keys:
            raw = key.get_secret_value().strip()
            if raw.startswith("sha256:") and len(raw) == 71:
                digests.append(bytes.fromhex(raw.removeprefix("sha256:")))
            elif raw:
                digests.append(hashlib.sha256(raw.encode("utf-8")).digest())
        self._digests = tuple(digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def match(self, token: str) -> str | None:
        """The id of the key `token` is (a short hex of its digest, safe to keep and log), or
        None when it is none of them."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        # Compare against every key, without stopping early: the time taken says nothing about
        # which key (or how much of one) matched.
        found: bytes | None = None
        for stored in self._digests:
            if hmac.compare_digest(digest, stored):
                found = stored
        return "key:" + found.hex()[:16] if found is not None else None


class AuthMiddleware:
    """Runs before routing, so a route added after the app was built is covered too."""

    def __init__(self, app: ASGIApp, *, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        if not self.keys.enabled:
            # Open WebUI and SillyTavern send an empty "Basic " header on every call: with keys
            # off, whatever is sent is ignored.
            _set_caller(scope, _client_address(scope))
            await self.app(scope, receive, send)
            return
        token = _credential(scope)
        caller = self.keys.match(token) if token is not None else None
        if caller is not None:
            _set_caller(scope, caller)
            await self.app(scope, receive, send)
            return
        a1111 = dialect_of(scope["path"]) == "a1111"
        if token is None:
            message = (
                "missing API key: send it as HTTP Basic, the key as the password (webuiapi: "
                "api.set_auth('any', KEY))"
                if a1111
                else "missing API key: send it as 'Authorization: Bearer <key>' (the OpenAI "
                "SDK does this with api_key=...)"
            )
        else:
            message = "invalid API key"
        response = error_response(
            401,
            message,
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Basic realm="imagegen"' if a1111 else "Bearer"},
            dialect=dialect_of(scope["path"]),
        )
        await response(scope, receive, send)


def caller_of(scope: Scope) -> str:
    """Who made the request: "key:<id>" with keys on, "addr:<host>" with keys off."""
    state = scope.get("state") or {}
    return str(state.get("caller") or _client_address(scope))


def _set_caller(scope: Scope, caller: str) -> None:
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
