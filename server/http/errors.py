"""Every HTTP error body, in one place: the OpenAI envelope {"error": {"message", "type", "param",
"code"}} with statuses the OpenAI SDK maps, A1111's own body on its /sdapi/v1 routes, and the
handlers that turn exceptions into them."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import errors
from server.request_schema import EDIT_ONLY_FIELDS

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


# Which error body a path answers with: A1111's clients (webuiapi, SillyTavern, Open WebUI's
# automatic1111 engine) read A1111's, everyone else the OpenAI envelope.
Dialect = Literal["openai", "a1111"]
A1111_PREFIX = "/sdapi/"


def dialect_of(path: str) -> Dialect:
    return "a1111" if path.startswith(A1111_PREFIX) else "openai"


class NotFoundError(errors.ServiceError):
    """A job or file id that does not exist (or no longer does)."""

    code = "not_found"


# Status and OpenAI error type per error class; the first class of an error's MRO found here
# decides (so a subclass inherits its parent's row unless it has its own). 499 is nginx's
# "client closed request": only metrics and job records ever see it.
_STATUS: dict[type[errors.ImagegenError], tuple[int, str]] = {
    errors.InvalidRequestError: (400, "invalid_request_error"),
    errors.LocalOnlyError: (403, "invalid_request_error"),
    errors.ModelNotFoundError: (404, "invalid_request_error"),
    NotFoundError: (404, "invalid_request_error"),
    errors.RateLimitedError: (429, "rate_limit_error"),
    errors.OutOfMemoryError: (503, "server_error"),
    errors.ProviderError: (502, "server_error"),
    errors.ModelUnavailableError: (503, "server_error"),
    errors.NotReadyError: (503, "server_error"),
    errors.DeviceFaultError: (503, "server_error"),
    errors.DeadlineExceededError: (504, "server_error"),
    errors.CancelledError: (499, "server_error"),
}


def status_of(exc: errors.ImagegenError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of `exc` (500 server_error where none is set)."""
    for cls in type(exc).__mro__:
        row = _STATUS.get(cls)
        if row is not None:
            return row
    return 500, "server_error"


def error_object(exc: errors.ImagegenError) -> dict[str, Any]:
    """The inner `error` object of the envelope (job records keep it as is)."""
    return {"message": exc.message, "type": status_of(exc)[1], "param": exc.param, "code": exc.code}


def error_body(
    message: str, *, error_type: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None,
    param: str | None = None,
    error_type: str | None = None,
    retry_after_s: int | None = None,
    headers: Mapping[str, str] | None = None,
    dialect: Dialect = "openai",
) -> JSONResponse:
    """The one builder of error responses."""
    all_headers = dict(headers or {})
    if retry_after_s is not None:
        all_headers["Retry-After"] = str(max(1, int(retry_after_s)))
    kind = error_type or _TYPE_BY_STATUS.get(status, "server_error")
    if dialect == "a1111":
        return JSONResponse(
            a1111_error_body(message, kind=code or kind), status_code=status, headers=all_headers
        )
    return JSONResponse(
        error_body(message, error_type=kind, code=code, param=param),
        status_code=status,
        headers=all_headers,
    )


def a1111_error_body(message: str, *, kind: str) -> dict[str, Any]:
    """A1111's body (modules/api/api.py handle_exception): its clients show `detail`; `error`
    is its exception's name, here our error code."""
    return {"error": kind, "detail": message, "body": "", "errors": message}


def from_service_error(exc: errors.ImagegenError, dialect: Dialect = "openai") -> JSONResponse:
    retry = (
        exc.retry_after_s
        if isinstance(exc, errors.RateLimitedError | errors.OutOfMemoryError)
        else None
    )
    if isinstance(exc, errors.NotReadyError):
        retry = 1
    status, error_type = status_of(exc)
    return error_response(
        status,
        exc.message,
        code=exc.code,
        param=exc.param,
        error_type=error_type,
        retry_after_s=retry,
        dialect=dialect,
    )


def internal_error_object(what: str) -> dict[str, Any]:
    """The error object for a failure the client cannot fix: the id to quote, never the
    exception's text (that is in the log, under the same id)."""
    return {
        "message": f"the server hit an internal error ({what}); it has been logged",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }


def internal_error(request_id: str | None, dialect: Dialect = "openai") -> JSONResponse:
    what = f"request id {request_id}" if request_id else "no request id"
    error = internal_error_object(what)
    return error_response(
        500, error["message"], code=error["code"], error_type=error["type"], dialect=dialect
    )


def internal_error_bytes(
    request_id: str | None, dialect: Dialect = "openai"
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The same 500 for raw ASGI middleware: (status, headers, body)."""
    response = internal_error(request_id, dialect)
    return response.status_code, list(response.raw_headers), bytes(response.body)


def _validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        if param in EDIT_ONLY_FIELDS:
            return (
                f"Unrecognized request argument supplied: {param} (image inputs and their "
                "fields go to POST /v1/images/edits, multipart, or POST /v1/jobs)",
                param,
            )
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"{param} is required", param
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if kind in ("model_attributes_type", "model_type", "dict_type") and param is None:
        return "the request body must be a JSON object", None
    message = str(error.get("msg", "invalid value"))
    # A whole-body refusal (param None) shows no input: it would be the body itself.
    whole_body = param is None and kind in ("unicode_surrogate", "json_depth")
    if "input" in error and kind not in ("model_attributes_type",) and not whole_body:
        shown = json.dumps(error["input"], default=str)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return (f"{param}: " if param else "") + f"{message}, got {shown}", param
    return f"{param}: {message}" if param else message, param


def install(app: FastAPI) -> None:
    """Exception handlers for everything the routes and FastAPI itself raise."""

    async def on_service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.ImagegenError)
        return from_service_error(exc, dialect_of(request.url.path))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        found = exc.errors()
        message, param = _validation_message(dict(found[0])) if found else ("invalid", None)
        return error_response(
            400, message, code="invalid_request", param=param, dialect=dialect_of(request.url.path)
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = (
            str(exc.detail)
            if exc.status_code != 404
            else (f"no route for {request.method} {request.url.path}")
        )
        if exc.status_code == 400 and message.startswith("There was an error parsing the body"):
            # FastAPI's answer to a body it cannot decode (not UTF-8, a broken form).
            code = "invalid_request"
            message = "the request body could not be read: send JSON (UTF-8) or a multipart form"
            if isinstance(exc.__cause__, RecursionError):
                # json.loads gives up past Python's recursion limit (about 1,000 levels).
                message = (
                    "the request body nests arrays/objects too deep to read; send a flatter body"
                )
        return error_response(
            exc.status_code,
            message,
            code=code,
            headers=exc.headers,
            dialect=dialect_of(request.url.path),
        )

    app.add_exception_handler(errors.ImagegenError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
