"""Per-request context as ASGI middleware: the request id (X-Request-Id on every response) and
the catch-all that logs an unexpected exception and answers with a generic 500 envelope."""

from __future__ import annotations

import logging
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import internal_error_bytes

log = logging.getLogger("server.http")


def new_request_id() -> str:
    return "img_" + uuid.uuid4().hex[:24]


def request_id_of(scope: Scope) -> str | None:
    state = scope.get("state") or {}
    value = state.get("request_id")
    return str(value) if value is not None else None


class RequestContextMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): it must not buffer streamed responses (SSE) or hide
    a client's disconnect from the routes that watch for it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("ascii"))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unhandled error in %s %s (request id %s)",
                scope.get("method"),
                scope.get("path"),
                request_id,
            )
            if started:
                # Headers are out: all that is left is to end the response.
                return
            status, headers, body = internal_error_bytes(request_id)
            await send_with_id(
                {"type": "http.response.start", "status": status, "headers": headers}
            )
            await send_with_id({"type": "http.response.body", "body": body})
