"""Image generation over HTTP: wire request -> service call (cancelled when the client goes away)
-> OpenAI-shaped response. The routes and the job runner both go through ImagesServing."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any, TypeVar

from models.base import NO_EVENTS, Events
from server import errors
from server.http.errors import status_of
from server.http.metrics import Metrics
from server.http.protocol import (
    ImageData,
    ImageGenerationRequest,
    ImagegenInfo,
    ImagesResponse,
)
from server.quotas import IN_PROCESS, Caller
from server.request import ImageRequest
from server.service import GenerationResult, ImageService
from server.settings import Settings

T = TypeVar("T")

# How often a waiting request checks whether its client is still there.
DISCONNECT_POLL_S = 0.1
# A request's own deadline in a header (seconds), for clients that cannot add a body field.
TIMEOUT_HEADER = "x-request-timeout"


class Readiness:
    """Whether the server takes generation work: models loaded and warmed up, not draining."""

    def __init__(
        self, models: list[str], *, fault: Callable[[], str | None] = lambda: None
    ) -> None:
        self.models = list(models)
        self.ready = not self.models
        self.draining = False
        # When a drain with a grace period (SIGTERM) gives up on work still in flight
        # (time.monotonic()); None: draining, if at all, stops everything now.
        self.drain_deadline: float | None = None
        self.load_error: str | None = None
        # Why the device can no longer work (a sticky fault): not ready for good.
        self.fault = fault

    def drain(self, grace_s: float) -> None:
        """Take no new work from now on; what is in flight (generations, jobs and their event
        streams) has `grace_s` to finish."""
        self.draining = True
        if self.drain_deadline is None:  # a second signal does not extend the grace
            self.drain_deadline = time.monotonic() + grace_s

    def drain_over(self) -> bool:
        """Whether work still in flight is to be given up: draining, and past the grace."""
        if not self.draining:
            return False
        return self.drain_deadline is None or time.monotonic() >= self.drain_deadline

    def reason(self) -> str | None:
        fault = self.fault()
        if fault is not None:
            return f"the device failed and the server must be restarted: {fault}"
        if self.draining:
            return "the server is shutting down and takes no new work"
        if self.load_error is not None:
            return f"model loading failed: {self.load_error}"
        if not self.ready:
            return f"models are still loading ({', '.join(self.models)}); retry shortly"
        return None

    def check(self) -> None:
        reason = self.reason()
        if reason is not None:
            raise errors.NotReadyError(reason)


async def _within(timeout_s: float | None, work: Awaitable[T]) -> T:
    if timeout_s is None:
        return await work
    try:
        async with asyncio.timeout(timeout_s):
            return await work
    except TimeoutError:
        raise errors.DeadlineExceededError(
            f"the request took longer than its deadline of {timeout_s:g} s (its `timeout`, "
            "the X-Request-Timeout header or server.request_timeout_s) and was cancelled; "
            "nothing was booked. Retry with a longer timeout, fewer steps or a smaller size",
            param="timeout",
        ) from None


class ImagesServing:
    def __init__(
        self,
        settings: Settings,
        service: ImageService,
        metrics: Metrics,
        readiness: Readiness,
    ) -> None:
        self.settings = settings
        self.service = service
        self.metrics = metrics
        self.readiness = readiness

    async def generate(
        self,
        body: ImageGenerationRequest,
        *,
        endpoint: str,
        request_id: str | None = None,
        events: Events = NO_EVENTS,
        timeout_s: float | None = None,
        caller: Caller = IN_PROCESS,
    ) -> GenerationResult:
        return await self.run(
            lambda: body.to_image_request(request_id=request_id),
            endpoint=endpoint,
            model=body.model,
            events=events,
            timeout_s=timeout_s,
            caller=caller,
        )

    def deadline_s(
        self, headers: Mapping[str, str], own: float | None = None, *, server_wide: bool = True
    ) -> float | None:
        """The shortest of the request's own `timeout`, its X-Request-Timeout header and
        (for a synchronous request) server.request_timeout_s; None where none is set."""
        given = [own, self.settings.server.request_timeout_s if server_wide else None]
        header = headers.get(TIMEOUT_HEADER)
        if header is not None:
            try:
                value = float(header)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise errors.InvalidRequestError(
                    f"the X-Request-Timeout header must be a number of seconds above 0, got "
                    f"'{header[:40]}'",
                    param="timeout",
                )
            given.append(value)
        set_ = [value for value in given if value is not None]
        return min(set_) if set_ else None

    async def run(
        self,
        build: Callable[[], ImageRequest],
        *,
        endpoint: str,
        model: str | None,
        events: Events = NO_EVENTS,
        timeout_s: float | None = None,
        caller: Caller = IN_PROCESS,
    ) -> GenerationResult:
        """The one generation path of every route: readiness, the request `build` makes (its
        errors are the client's, counted like the service's) for `caller`, the service within
        the request's deadline (`timeout_s`: past it the work is cancelled as if the client
        had gone, so nothing is cached or booked), the metrics."""
        started = time.perf_counter()
        try:
            self.readiness.check()
            request = dataclasses.replace(build(), caller=caller)
            result = await _within(timeout_s, self.service.generate(request, events=events))
        except errors.ImagegenError as exc:
            self.metrics.failed(endpoint, self._model_label(model), status_of(exc)[0])
            raise
        except asyncio.CancelledError:
            self.metrics.failed(endpoint, self._model_label(model), 499)
            raise
        except Exception:
            self.metrics.failed(endpoint, self._model_label(model), 500)
            raise
        self.metrics.served(endpoint, result, time.perf_counter() - started)
        return result

    async def admit(self, body: ImageGenerationRequest, caller: Caller = IN_PROCESS) -> None:
        """Refuse, now, what a generation of `body` by `caller` would be refused for (the job
        API answers these as HTTP errors and creates no job)."""
        self.readiness.check()
        await self.service.admit(dataclasses.replace(body.to_image_request(), caller=caller))

    def _model_label(self, model: str | None) -> str:
        # Only catalogue names become label values: a client must not be able to grow the
        # metric's label set with made-up model names.
        name = model or self.settings.default_model
        return name if self.service.knows_model(name) else "unknown"

    async def render(
        self, result: GenerationResult, body: ImageGenerationRequest, base_url: str
    ) -> dict[str, Any]:
        """The /v1/images/generations response body."""
        as_url = body.response_format == "url"
        if as_url:
            # A `url` must resolve: results the cache did not keep (a provider that ignores
            # seeds) are stored for download (disk work: off the event loop).
            await asyncio.to_thread(self.service.keep_for_download, result)
        base = (self.settings.server.public_base_url or base_url).rstrip("/")
        data = []
        for image in result.images:
            item = ImageData(revised_prompt=result.revised_prompt, seed=image.seed)
            if as_url:
                item.url = f"{base}/v1/files/{image.sha256}"
            else:
                item.b64_json = base64.b64encode(image.data).decode("ascii")
            data.append(item)
        first = result.images[0] if result.images else None
        dropped = sorted({*result.dropped_params, *body.edge_dropped_params()})
        response = ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=first.format if first else result.params.output_format,
            size=f"{result.params.width}x{result.params.height}",
            imagegen=ImagegenInfo(
                request_id=result.request_id,
                model=result.model,
                provider=result.provider,
                cached=result.cached,
                cost_usd=result.cost_usd,
                gpu_seconds=result.gpu_seconds,
                saved_usd=result.saved_usd,
                timings=result.timings,
                dropped_params=dropped,
                notices=list(result.notices),
            ),
        )
        body_out = response.model_dump()
        unused = "b64_json" if as_url else "url"
        for item_out in body_out["data"]:
            item_out.pop(unused, None)
        return body_out


def response_headers(result: GenerationResult) -> dict[str, str]:
    return {
        "X-Request-Id": result.request_id,
        "X-Imagegen-Cache": "hit" if result.cached else "miss",
        # Positional notation, every digit of the float kept: "0.0000352887", not "3.5e-05".
        "X-Imagegen-Cost-USD": format(Decimal(repr(result.cost_usd)), "f"),
    }


async def unless_disconnected(
    is_disconnected: Callable[[], Awaitable[bool]], work: Awaitable[T]
) -> T:
    """Run `work`, cancelling it if the client disconnects first: a request still queued is
    dropped before it reaches the device, a running one is discarded (never cached or billed)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise errors.CancelledError("the client disconnected before the result was ready")
    finally:
        if not task.done():
            task.cancel()
