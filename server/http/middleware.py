"""Per-request ASGI middleware: the request id (X-Request-Id on every response), the catch-all
that logs an unexpected exception and answers with a generic 500, and the cap on request
bodies; both answers in the error shape of the path's dialect (server.http.errors)."""

from __future__ import annotations

import logging
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import dialect_of, error_response, internal_error_bytes

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
            status, headers, body = internal_error_bytes(request_id, dialect_of(scope["path"]))
            await send_with_id(
                {"type": "http.response.start", "status": status, "headers": headers}
            )
            await send_with_id({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    """Raised into the app from `receive` once a body passes the cap (the 413 is already out)."""


class BodyLimitMiddleware:
    """Caps request bodies (batch uploads are the big ones) at server.max_body_mb: a declared
    Content-Length past it is refused before anything is read; a chunked body is cut off as
    soon as it passes it. Either way the answer is a 413 (A1111's shape on /sdapi/, else the
    OpenAI envelope)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started and not refused:
                        refused = True
                        await self._refuse(scope, receive, send)
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is out: whatever the app makes of the cut-off body is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            # The app may wrap the cut-off into an error of its own; the 413 has answered it.
            if not refused:
                raise

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit_mb = self.max_bytes / 1024**2
        response = error_response(
            413,
            f"the request body is larger than this server takes ({limit_mb:g} MB, "
            "server.max_body_mb); split the batch into smaller uploads or raise the limit",
            code="request_too_large",
            dialect=dialect_of(scope["path"]),
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
