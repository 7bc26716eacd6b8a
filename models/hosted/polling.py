"""Submit-then-poll providers (BFL, midjourney-proxy): one loop that polls a task until it ends."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from models.base import TransientBackendError
from models.hosted.client import HostedHTTP
from models.hosted.results import Report

T = TypeVar("T")

# Each wait is this much longer than the one before, up to `max_interval` poll intervals: a
# quick task is seen quickly, a slow one is not asked about every second.
_POLL_BACKOFF = 1.5


@dataclass(frozen=True)
class Polled(Generic[T]):
    """What one poll answer says: the task's status, its progress (0..1) where the provider
    gives one, and its result once it is done. A terminal failure is raised by the reader."""

    status: str
    result: T | None = None
    progress: float | None = None


async def poll_until(
    http: HostedHTTP,
    url: str,
    *,
    task_id: str,
    read: Callable[[dict[str, Any]], Polled[T]],
    report: Report,
    headers: Mapping[str, str] | None = None,
    max_interval: float,
) -> T:
    """GET `url` every poll interval (`providers.<id>.poll_interval_s`, growing) until `read`
    finds a result or raises, or `poll_timeout_s` has passed (a transient error: a fallback
    may serve the request). Each poll is one call with the shared retries."""
    config = http.config
    interval = config.poll_interval_s
    waited = 0.0
    status = ""
    while waited < config.poll_timeout_s:
        await http.sleep(interval)
        waited += interval
        polled = read(
            await http.send_json("GET", url, what=f"poll task {task_id}", headers=headers)
        )
        status = polled.status
        if polled.progress is not None:
            report(polled.progress)
        if polled.result is not None:
            return polled.result
        interval = min(interval * _POLL_BACKOFF, config.poll_interval_s * max_interval)
    raise TransientBackendError(
        f"{config.provider}: task {task_id} still {status} after {waited:.0f} s "
        f"(providers.{config.provider}.poll_timeout_s)",
        provider=config.provider,
    )
