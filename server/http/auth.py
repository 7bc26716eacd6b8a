"""API keys: Bearer tokens checked in constant time against stored sha256 digests, enforced for
every route (present and future) except the health probes, as ASGI middleware."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from server.http.errors import error_response

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

    def accepts(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        # Compare against every key, without stopping early: the time taken says nothing about
        # which key (or how much of one) matched.
        found = False
        for stored in self._digests:
            found |= hmac.compare_digest(digest, stored)
        return found


class AuthMiddleware:
    """Runs before routing, so a route added after the app was built is covered too."""

    def __init__(self, app: ASGIApp, *, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is None:
            response = error_response(
                401,
                "missing API key: send it as 'Authorization: Bearer <key>' (the OpenAI SDK "
                "does this with api_key=...)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        elif not self.keys.accepts(token):
            response = error_response(
                401,
                "invalid API key",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None
