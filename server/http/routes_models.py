"""Routes: the model list (OpenAI shape) and single models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server import errors
from server.http.protocol import DeviceCard, ModelCard, ModelList
from server.http.state import AppState, app_state

router = APIRouter()


def _card(state: AppState, row: dict[str, Any]) -> ModelCard:
    provider = str(row["provider"])
    return ModelCard(
        id=str(row["name"]),
        created=int(state.started),
        owned_by="imagegen" if provider == "local" else provider,
        loaded=bool(row["loaded"]),
        available=bool(row["available"]),
        kind=str(row["kind"]),
        description=str(row.get("description") or ""),
        alias_of=row.get("alias_of"),
        where=row.get("where"),
        device=row.get("device"),
        footprint_bytes=row.get("footprint_bytes"),
        pinned=row.get("pinned"),
        mode=row.get("mode"),
    )


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = app_state(request)
    return ModelList(
        data=[_card(state, row) for row in state.service.models()],
        devices=[DeviceCard.model_validate(row) for row in state.service.devices()],
    )


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = app_state(request)
    for row in state.service.models():
        if row["name"] == model_id:
            return _card(state, row)
    raise errors.ModelNotFoundError.for_model(model_id)
