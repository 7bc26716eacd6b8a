"""Routes: the async job API (create, read, cancel, and progress as server-sent events)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.http import sse
from server.http.protocol import ImageGenerationRequest, Job
from server.http.state import app_state

router = APIRouter()


@router.post("/v1/jobs", status_code=202)
async def create_job(body: ImageGenerationRequest, request: Request) -> JSONResponse:
    job = await app_state(request).jobs.submit(body, str(request.base_url))
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
            draining=lambda: state.readiness.draining,
            on_close=lambda: state.jobs.unsubscribe(job_id, queue),
        ),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
