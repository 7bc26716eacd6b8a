"""Route: the LoRA library (GET /v1/loras)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from server.http.protocol import LoraCard, LoraList
from server.http.state import app_state

router = APIRouter()


@router.get("/v1/loras")
async def list_loras(request: Request) -> LoraList:
    # Off the loop: the first listing of a file hashes it.
    rows = await asyncio.to_thread(app_state(request).service.loras)
    return LoraList(
        data=[
            LoraCard(
                id=row["name"],
                family=row["family"],
                format=row["format"],
                sha256=row["sha256"],
                size_bytes=row["size_bytes"],
            )
            for row in rows
        ]
    )
