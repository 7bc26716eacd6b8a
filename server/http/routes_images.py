"""Routes: POST /v1/images/generations, POST /v1/images/edits (multipart, as OpenAI defines it)
and GET /v1/files/{id} (images by content hash)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.http.auth import caller_of
from server.http.edits import EDIT_FORM_SCHEMA, read_edit_form
from server.http.errors import NotFoundError
from server.http.middleware import request_id_of
from server.http.protocol import ImageGenerationRequest, ImagesResponse
from server.http.serving import response_headers, unless_disconnected
from server.http.state import app_state
from server.http.streaming import stream_images

router = APIRouter()

_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EDIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": EDIT_FORM_SCHEMA}},
    }
}


@router.post("/v1/images/generations")
async def create_image(body: ImageGenerationRequest, request: Request) -> Response:
    return await _generate(body, request, endpoint="images")


@router.post(
    "/v1/images/edits",
    openapi_extra=_EDIT_BODY,
    responses={200: {"model": ImagesResponse, "description": "The edited images"}},
)
async def edit_image(request: Request) -> Response:
    return await _generate(await read_edit_form(request), request, endpoint="edits")


async def _generate(body: ImageGenerationRequest, request: Request, *, endpoint: str) -> Response:
    if body.stream:
        return await stream_images(body, request, endpoint=endpoint)
    state = app_state(request)
    result = await unless_disconnected(
        request.is_disconnected,
        state.serving.generate(
            body,
            endpoint=endpoint,
            request_id=request_id_of(request.scope),
            timeout_s=state.serving.deadline_s(request.headers, body.timeout),
            caller=caller_of(request.scope),
        ),
    )
    return JSONResponse(
        await state.serving.render(result, body, str(request.base_url)),
        headers=response_headers(result),
    )


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, request: Request) -> Response:
    state = app_state(request)
    found = await asyncio.to_thread(state.service.read_file, file_id)
    if found is None:
        raise NotFoundError(
            f"no file with id '{file_id}' (files are kept while they are in the result cache)",
            param="file_id",
        )
    data, fmt = found
    return Response(
        data,
        media_type=_MEDIA_TYPES.get(fmt, "application/octet-stream"),
        # Content-addressed: the bytes behind an id never change.
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )
