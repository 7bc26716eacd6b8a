"""Routes: batch jobs (create from an inline list or a JSONL/CSV upload, or dry-run; read;
cancel) and their results (the manifest, its files, a zip of both). A batch is a job too:
GET /v1/jobs/{id}, its /events and DELETE /v1/jobs/{id} work on it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask

from server.http.auth import caller_of
from server.http.batches import read_submission
from server.http.protocol import Batch, BatchCreateRequest, BatchDryRun
from server.http.state import app_state

router = APIRouter()

# Both bodies POST /v1/batches takes (it reads the request itself to tell them apart).
_CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": BatchCreateRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL (one request per line) or CSV with a header",
                        },
                        "model": {"type": "string"},
                        "preset": {"type": "string"},
                        "concurrency": {"type": "integer", "minimum": 1, "maximum": 64},
                        "budget_usd": {"type": "number", "minimum": 0},
                        "dry_run": {"type": "boolean"},
                    },
                }
            },
        },
    }
}


@router.post(
    "/v1/batches",
    status_code=202,
    openapi_extra=_CREATE_BODY,
    responses={
        202: {"model": Batch, "description": "The batch, started as a job"},
        200: {"model": BatchDryRun, "description": "dry_run: the projection; nothing ran"},
    },
)
async def create_batch(request: Request) -> JSONResponse:
    state = app_state(request)
    submission = await read_submission(request)
    if submission.options.dry_run:
        return JSONResponse(state.batches.plan(submission).model_dump())
    batch = await state.batches.submit(submission, str(request.base_url), caller_of(request.scope))
    return JSONResponse(batch.model_dump(), status_code=202)


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, request: Request) -> Batch:
    return await app_state(request).batches.get(batch_id, str(request.base_url))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> Batch:
    return await app_state(request).batches.cancel(batch_id, str(request.base_url))


@router.get("/v1/batches/{batch_id}/manifest")
async def get_manifest(batch_id: str, request: Request) -> Response:
    body = await app_state(request).batches.manifest(batch_id, str(request.base_url))
    return Response(body, media_type="application/x-ndjson")


@router.get("/v1/batches/{batch_id}/files/{name}")
async def get_batch_file(batch_id: str, name: str, request: Request) -> FileResponse:
    path, media_type = await app_state(request).batches.file(batch_id, name)
    return FileResponse(path, media_type=media_type)


@router.get("/v1/batches/{batch_id}/archive")
async def get_archive(batch_id: str, request: Request) -> FileResponse:
    path = await app_state(request).batches.archive(batch_id)
    return FileResponse(
        path,
        media_type="application/zip",
        filename=f"{batch_id}.zip",
        background=BackgroundTask(_remove, path),
    )


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
