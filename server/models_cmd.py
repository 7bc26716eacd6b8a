"""`imagegen models --server URL`: the model list of a running server (GET /v1/models), where
each local model is (device, host RAM or disk), what it takes, and each device's budget. The
listing of this process alone cannot say: it has loaded nothing."""

from __future__ import annotations

from typing import Any

from server import errors

_TIMEOUT_S = 10.0


def fetch(server: str, api_key: str | None) -> dict[str, Any]:
    """The server's GET /v1/models body. Raises what to do when it cannot be had."""
    import httpx

    url = server.rstrip("/") + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise errors.ServiceError(
            f"--server: cannot reach {url} ({type(exc).__name__}); is `imagegen serve` "
            "running there?"
        ) from None
    if response.status_code == 401:
        raise errors.InvalidRequestError(
            "--server: the server asks for an API key; pass --api-key or set IMAGEGEN_API_KEY",
            param="api_key",
        )
    if response.status_code != 200:
        raise errors.ServiceError(f"--server: GET {url} answered {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise errors.ServiceError(f"--server: {url} did not answer with a model list")
    return body


def gigabytes(value: Any) -> str:
    """Bytes for a person: GB, or MB below one (the tiny models take a few)."""
    if value is None:
        return ""
    size = int(value)
    return f"{size / 1024**3:.2f} GB" if size >= 1024**3 else f"{size / 1024**2:.1f} MB"


def model_cells(card: dict[str, Any]) -> list[str]:
    where = card.get("where") or ""
    if where and card.get("mode") not in (None, "whole"):
        where += f" ({card['mode']})"
    return [
        str(card["id"]),
        str(card.get("kind") or ""),
        str(card.get("owned_by") or ""),
        "yes" if card.get("available") else "no",
        where,
        str(card.get("device") or ""),
        gigabytes(card.get("footprint_bytes")),
    ]


MODEL_HEADERS = ["model", "kind", "owned by", "available", "where", "device", "footprint"]
DEVICE_HEADERS = ["device", "budget", "used", "free", "host RAM used", "queued", "failed"]


def device_cells(device: dict[str, Any]) -> list[str]:
    host = device.get("host_budget_bytes") or 0
    return [
        str(device["device"]),
        gigabytes(device.get("budget_bytes")) or "no limit",
        gigabytes(device.get("used_bytes")),
        gigabytes(device.get("free_bytes")),
        f"{gigabytes(device.get('host_used_bytes'))} of {gigabytes(host)}" if host else "",
        str(device.get("queued_images", 0)),
        str(device.get("failed") or ""),
    ]
