"""Routes: health probes, Prometheus metrics and ledger statistics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.http.errors import error_response
from server.http.metrics import CONTENT_TYPE
from server.http.state import app_state

router = APIRouter()


@router.get("/livez")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    readiness = app_state(request).readiness
    reason = readiness.reason()
    if reason is not None:
        return error_response(
            503, reason, code="not_ready", error_type="server_error", retry_after_s=1
        )
    return JSONResponse({"status": "ready", "models": readiness.models})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = app_state(request)
    state.metrics.residency(state.service.devices(), state.service.models())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/stats")
async def stats(request: Request) -> dict[str, Any]:
    return app_state(request).service.stats()
