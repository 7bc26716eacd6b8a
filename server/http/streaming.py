"""Streamed image responses: `stream: true` on POST /v1/images/generations and /v1/images/edits,
as server-sent events in OpenAI's format. `partial_images` (0-3) previews of the denoising state
per image (`<kind>.partial_image`, spread over the schedule), then one `<kind>.completed` event per
image, where kind is `image_generation`, or `image_edit` for edits (the openai SDK tells the two
apart by it).

Until the work is admitted (queued on the device, or sent to the provider) the answer is plain
HTTP: a bad field, an unknown model or a full queue is a status code and the error envelope, as
without stream. After that, a failure is an event whose data has `error` (the SDK raises
APIError for it). A result from the cache has no denoising to show: its images come at once,
with no partials, which OpenAI's contract allows ("the final image may be sent before the full
number of partial images"). So does a hosted model, which shows no intermediate state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from models.base import Events
from server import errors
from server.http import previews, sse
from server.http.auth import caller_of
from server.http.errors import error_object, internal_error_object
from server.http.middleware import request_id_of
from server.http.protocol import ImageGenerationRequest
from server.http.serving import DISCONNECT_POLL_S
from server.http.state import app_state
from server.service import GenerationResult

log = logging.getLogger(__name__)

# The event types' prefix per route.
KINDS = {"images": "image_generation", "edits": "image_edit"}


class StreamEvents(Events):
    """One streamed request's view of the event channel: admission, and the previews that
    become partial images. Hooks come from the device worker's thread (local) or the loop
    (hosted); what they produce is handed to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, partials: int, output_format: str):
        self.loop = loop
        self.partials = partials
        self.output_format = output_format
        self.admitted = asyncio.Event()
        # Partial images, per step: one base64 image per image of the request.
        self.queue: asyncio.Queue[list[str]] = asyncio.Queue()
        # Previews handed over so far (the worker's thread only): never more than asked,
        # even when the quality check runs the request a second time.
        self._sent = 0

    def queued(self, position: int) -> None:
        self._admit()

    def started(self) -> None:
        self._admit()

    def wants_preview(self, step: int, total: int) -> bool:
        return self._sent < self.partials and step in previews.spread(total, self.partials)

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        self._admit()
        if not preview or self._sent >= self.partials:
            return
        self._sent += 1
        images = [previews.encoded(image, self.output_format) for image in preview]
        self._on_loop(self.queue.put_nowait, images)

    def _admit(self) -> None:
        self._on_loop(self.admitted.set)

    def _on_loop(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server has stopped
            self.loop.call_soon_threadsafe(fn, *args)


async def stream_images(
    body: ImageGenerationRequest, request: Request, *, endpoint: str
) -> StreamingResponse:
    state = app_state(request)
    events = StreamEvents(
        asyncio.get_running_loop(), body.partial_images or 0, body.output_format or "png"
    )
    work = asyncio.ensure_future(
        state.serving.generate(
            body,
            endpoint=endpoint,
            request_id=request_id_of(request.scope),
            events=events,
            timeout_s=state.serving.deadline_s(request.headers, body.timeout),
            caller=caller_of(request.scope),
        )
    )
    try:
        await _admitted(work, events, request)
    except BaseException:
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise
    # Streamed images are always base64 (OpenAI streams have no url form).
    as_b64 = body.model_copy(update={"response_format": None})
    base_url = str(request.base_url)

    async def render(result: GenerationResult) -> dict[str, Any]:
        return await state.serving.render(result, as_b64, base_url)

    return StreamingResponse(
        _events(work, events, _Shape(KINDS[endpoint], body), render),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _admitted(work: asyncio.Future[Any], events: StreamEvents, request: Request) -> None:
    """Wait until the work is admitted or done (a refusal raises here, as an HTTP error)."""
    admitted: asyncio.Future[Any] = asyncio.ensure_future(events.admitted.wait())
    try:
        while True:
            done, _ = await asyncio.wait(
                {work, admitted}, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_COMPLETED
            )
            if work in done:
                work.result()  # the refusal, raised before any byte is sent
                return
            if done:
                return
            if await request.is_disconnected():
                raise errors.CancelledError("the client disconnected before the result was ready")
    finally:
        admitted.cancel()


class _Shape:
    """The events of one stream, with the members each repeats (OpenAI's: the request's
    settings)."""

    def __init__(self, kind: str, body: ImageGenerationRequest) -> None:
        self.kind = kind
        # A partial is of "the requested image": its size as asked ("auto": the model's).
        self.requested_size = body.size or "auto"
        self.common = {
            "quality": body.quality or "auto",
            "background": body.background or "auto",
            "output_format": body.output_format or "png",
        }

    def partials(self, images: list[str], index: int) -> bytes:
        """One step's partial images (one per image of the request, told apart by
        `image_index` where there are several)."""
        many = len(images) > 1
        return b"".join(
            self._event(
                "partial_image",
                b64,
                self.requested_size,
                partial_image_index=index,
                **({"image_index": i} if many else {}),
            )
            for i, b64 in enumerate(images)
        )

    def completed(self, rendered: dict[str, Any]) -> bytes:
        """One event per image of the rendered /v1/images/generations body, with its seed
        and the `imagegen` extension as that body has them."""
        info = rendered["imagegen"]
        extra: dict[str, Any] = {}
        if info["provider"] == "local":
            # Local work bills GPU time (its cost is in `imagegen`), not tokens.
            extra["usage"] = {
                "input_tokens": 0,
                "output_tokens": 0,
                "total_tokens": 0,
                "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
            }
        many = len(rendered["data"]) > 1
        return b"".join(
            self._event(
                "completed",
                item["b64_json"],
                rendered["size"],
                seed=item["seed"],
                imagegen=info,
                **extra,
                **({"image_index": i} if many else {}),
            )
            for i, item in enumerate(rendered["data"])
        )

    def _event(self, name: str, b64: str, size: str, **extra: Any) -> bytes:
        kind = f"{self.kind}.{name}"
        data = {
            "type": kind,
            "b64_json": b64,
            "created_at": int(time.time()),
            "size": size,
            **self.common,
            **extra,
        }
        return sse.encode(sse.Event(kind, data))


async def _events(
    work: asyncio.Future[GenerationResult],
    events: StreamEvents,
    shape: _Shape,
    render: Callable[[GenerationResult], Awaitable[dict[str, Any]]],
) -> AsyncIterator[bytes]:
    """The partial images as they come, then the completed images (or the error)."""
    sent = 0
    try:
        while not work.done():
            next_partial = asyncio.ensure_future(events.queue.get())
            waiting: set[asyncio.Future[Any]] = {work, next_partial}
            done, _ = await asyncio.wait(
                waiting, timeout=sse.KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                yield sse.KEEPALIVE
            if next_partial in done:
                yield shape.partials(next_partial.result(), sent)
                sent += 1
            else:
                next_partial.cancel()
        # Previews handed over before the result are still sent first.
        while not events.queue.empty():
            yield shape.partials(events.queue.get_nowait(), sent)
            sent += 1
        try:
            rendered = await render(work.result())
        except errors.ImagegenError as exc:
            yield _error(error_object(exc))
            return
        except Exception:
            log.exception("streamed generation failed")
            yield _error(internal_error_object("the streamed generation"))
            return
        yield shape.completed(rendered)
    finally:
        if not work.done():
            # The client went away: a queued request is dropped, a running one discarded.
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)


def _error(error: dict[str, Any]) -> bytes:
    return sse.encode(sse.Event("error", {"type": "error", "error": error}))
