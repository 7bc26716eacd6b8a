"""Routes: the async job API (create, read, cancel, and progress as server-sent events). A job
is a generation or an edit: a JSON body (an edit's images as base64 members) or the multipart
form of POST /v1/images/edits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.http import sse
from server.http.auth import caller_of
from server.http.edits import (
    EDIT_FORM_SCHEMA,
    FORM_TYPES,
    JOB_JSON_SCHEMA,
    edit_from_json,
    media_type,
    read_edit_form,
)
from server.http.protocol import Job
from server.http.state import app_state

router = APIRouter()

# Both bodies POST /v1/jobs takes (it reads the request itself to tell them apart).
_CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": JOB_JSON_SCHEMA},
            "multipart/form-data": {"schema": EDIT_FORM_SCHEMA},
        },
    }
}


@router.post(
    "/v1/jobs",
    status_code=202,
    openapi_extra=_CREATE_BODY,
    responses={202: {"model": Job, "description": "The job, queued"}},
)
async def create_job(request: Request) -> JSONResponse:
    if media_type(request) in FORM_TYPES:
        body = await read_edit_form(request)
    else:
        body = edit_from_json(await request.body())
    job = await app_state(request).jobs.submit(
        body, str(request.base_url), caller_of(request.scope)
    )
    return JSONResponse(job.model_dump(), status_code=202)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> Job:
    return app_state(request).jobs.get(job_id)


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> Job:
    return await app_state(request).jobs.cancel(job_id)


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    state = app_state(request)
    initial, queue = state.jobs.subscribe(job_id)
    return StreamingResponse(
        sse.stream(
            initial,
            queue,
            given_up=state.readiness.drain_over,
            farewell=lambda: state.jobs.interrupted_event(job_id),
            on_close=lambda: state.jobs.unsubscribe(job_id, queue),
        ),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
