"""What the A1111 API keeps per caller (an API key, or a client address with keys off): the
default model POST /sdapi/v1/options set (in the database, server.http.a1111_store), and the
calls in flight, in memory, that /sdapi/v1/progress reports and /interrupt and /skip cancel.
One caller never sees or stops another's work: A1111's own state is global, a shared
server's must not be."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from models.base import Events
from server.http import previews
from server.http.a1111_store import DefaultModels
from server.store.sql import Database


@dataclass(eq=False)
class A1111Call(Events):
    """One txt2img/img2img call: what its backend reported (written from the device worker's
    thread: plain attribute writes, never blocking)."""

    task_id: str
    started_at: float = field(default_factory=time.time)
    running: bool = False
    step: int = 0
    total: int = 0
    interrupted: bool = False
    task: asyncio.Task[Any] | None = None
    # Live previews: one every this many steps (0: none), once someone has polled
    # /progress for it (`watched`); the latest is the first image's (a PIL image).
    preview_every: int = 0
    watched: bool = False
    preview: Any = None

    def started(self) -> None:
        self.running = True

    def wants_preview(self, step: int, total: int) -> bool:
        return self.watched and previews.every(step, self.preview_every)

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        self.running = True
        self.step, self.total = step, total
        if preview:
            self.preview = preview[0]

    def retry(self, reason: str) -> None:
        self.step = 0

    def interrupt(self) -> None:
        self.interrupted = True
        if self.task is not None:
            self.task.cancel()


class A1111State:
    def __init__(self, db: Database) -> None:
        self._models = DefaultModels(db)
        self._calls: dict[str, list[A1111Call]] = defaultdict(list)

    def default_model(self, caller: str) -> str | None:
        return self._models.get(caller)

    def set_default_model(self, caller: str, model: str) -> None:
        self._models.set(caller, model)

    def begin(self, caller: str, task_id: str, *, preview_every: int = 0) -> A1111Call:
        call = A1111Call(task_id=task_id, preview_every=preview_every)
        self._calls[caller].append(call)
        return call

    def end(self, caller: str, call: A1111Call) -> None:
        calls = self._calls.get(caller, [])
        if call in calls:
            calls.remove(call)
        if not calls:
            self._calls.pop(caller, None)

    def calls(self, caller: str) -> list[A1111Call]:
        return list(self._calls.get(caller, ()))

    def interrupt(self, caller: str) -> int:
        """Cancel the caller's calls (queued ones never reach the device); how many."""
        calls = self.calls(caller)
        for call in calls:
            call.interrupt()
        return len(calls)

    def progress(self, caller: str, *, show_image: bool = True) -> dict[str, Any]:
        """A1111's /progress body for the caller: idle (progress 0, job_count 0) when nothing
        of theirs runs, which is what SillyTavern and webuiapi wait for. A poll that shows
        the image turns previews on for the caller's calls: until someone looks, none is
        made."""
        calls = self.calls(caller)
        if show_image:
            for call in calls:
                call.watched = True
        current = next((c for c in calls if c.running), calls[0] if calls else None)
        fraction = 0.0
        eta = 0.0
        if current is not None and current.total:
            fraction = min(current.step / current.total, 1.0)
            elapsed = time.time() - current.started_at
            eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        started = (
            time.strftime("%Y%m%d%H%M%S", time.localtime(current.started_at)) if current else "0"
        )
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "skipped": False,
                "interrupted": bool(current and current.interrupted),
                "stopping_generation": False,
                "job": f"task({current.task_id})" if current else "",
                "job_count": len(calls),
                "job_timestamp": started,
                "job_no": 0,
                "sampling_step": current.step if current else 0,
                "sampling_steps": current.total if current else 0,
            },
            "current_image": (
                previews.encoded(current.preview)
                if show_image and current is not None and current.preview is not None
                else None
            ),
            "textinfo": None,
            "current_task": current.task_id if current else None,
        }
