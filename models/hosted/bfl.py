"""Black Forest Labs FLUX API: submit (`POST /v1/{model}`), poll the returned URL, download.

The submit answer's `polling_url` is used as given (it may be regional) and its `cost`
(credits, $0.01 each) is the cost. `result.sample` is a signed URL that expires in minutes, so
it is downloaded as soon as the task is Ready. Moderation arrives as a status on a 200.
n > 1 submits n tasks (seeds s+i) and polls them together.

Image inputs (bfl-openapi.json): Kontext edits by instruction with `input_image` (base64) and
up to three more references (`input_image_2..4`); FLUX.2 takes up to eight (klein four);
FLUX.1 Fill [pro] (`flux-pro-1.0-fill`) repaints where its black-and-white `mask` is white, as
ours, at the image's own size. None of them has a strength: it is reported dropped (the edit
itself is honoured). FLUX1.1 and dev take only a Redux `image_prompt`, a remix and not an edit
of the picture: they refuse image inputs.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

from models.base import (
    BackendResult,
    ContentFilteredError,
    Events,
    GenerationParams,
    InvalidParamsError,
    TransientBackendError,
)
from models.hosted.backend import HostedBackend
from models.hosted.client import same_site
from models.hosted.inputs import EditSupport, b64
from models.hosted.polling import Polled, poll_until
from models.hosted.results import Piece, Report, fan_out, to_image, total_cost

Shape = Literal["grid32", "grid16", "aspect", "image"]

USD_PER_CREDIT = 0.01
_MODERATED = frozenset({"Request Moderated", "Content Moderated"})
_FAILED = frozenset({"Error", "Task not found"})
_MAX_MEGAPIXELS_FLUX2 = 4 * 1024 * 1024
# Ultra and Kontext take an aspect ratio "between 21:9 and 9:21" (bfl-openapi.json).
_WIDEST = 21 / 9
# The longest wait between polls, in poll intervals (a task takes seconds).
_POLL_MAX_INTERVALS = 8.0
_FILL = "flux-pro-1.0-fill"
# steps and guidance ranges of the models that take them (bfl-openapi.json).
_TUNABLE: dict[str, tuple[tuple[int, int], tuple[float, float]]] = {
    "flux-dev": ((1, 50), (1.5, 5.0)),
    _FILL: ((15, 50), (1.5, 100.0)),
}
_NO_EDITS_WHY = (
    "its only image field is a Redux image_prompt, a remix rather than an edit; "
    "flux-kontext-pro edits an image, flux-pro-1.0-fill inpaints"
)


def edit_support(provider_model: str) -> EditSupport:
    """What each BFL endpoint takes, from its request schema in bfl-openapi.json."""
    if provider_model == _FILL:
        return EditSupport(
            tasks=frozenset({"inpaint"}),
            max_images=1,
            why="FLUX.1 Fill repaints a masked area of one image: send an image and a mask",
        )
    references = {"flux-kontext": 4, "flux-2-klein": 4, "flux-2-": 8}
    for prefix, count in references.items():
        if provider_model.startswith(prefix):
            return EditSupport(
                tasks=frozenset({"txt2img", "img2img"}),
                max_images=count,
                why=f"{provider_model} edits by instruction and takes no mask; "
                "flux-pro-1.0-fill inpaints",
            )
    return EditSupport(why=_NO_EDITS_WHY)


def shape_of(provider_model: str) -> Shape:
    if provider_model == _FILL:
        return "image"  # no size field: the output is the input image's size
    if provider_model.startswith("flux-2-"):
        return "grid16"
    if provider_model.startswith(("flux-pro-1.1-ultra", "flux-kontext")):
        return "aspect"
    return "grid32"


def reduced_ratio(width: int, height: int) -> str:
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


class BFLBackend(HostedBackend):
    @property
    def shape(self) -> Shape:
        return shape_of(self.provider_model)

    @property
    def tunable(self) -> bool:
        """Whether the endpoint takes steps and guidance."""
        return self.provider_model in _TUNABLE

    def edit_support(self) -> EditSupport:
        return edit_support(self.provider_model)

    def reproducible(self, params: GenerationParams) -> bool:
        return True  # BFL's seed fixes the image (its results are cached as deterministic)

    def resolve(self, params: GenerationParams) -> GenerationParams:
        if self.tunable:
            params = _with_defaults(
                params, self.spec.defaults.steps, self.spec.defaults.guidance_scale
            )
        self._check(params)
        return params

    def _check(self, params: GenerationParams) -> None:
        width, height, size = params.width, params.height, f"{params.width}x{params.height}"
        shape = self.shape
        if shape == "grid32" and not (
            width % 32 == 0
            and height % 32 == 0
            and min(width, height) >= 256
            and max(width, height) <= 1440
        ):
            raise InvalidParamsError(
                f"size must be WIDTHxHEIGHT with both sides multiples of 32 between 256 and "
                f"1440 for {self.provider_model}, got '{size}'",
                provider=self.provider,
                param="size",
            )
        if shape == "grid16" and not (
            width % 16 == 0
            and height % 16 == 0
            and min(width, height) >= 64
            and width * height <= _MAX_MEGAPIXELS_FLUX2
        ):
            raise InvalidParamsError(
                f"size must be WIDTHxHEIGHT with both sides multiples of 16, at least 64 and "
                f"at most 4 megapixels in all for {self.provider_model}, got '{size}'",
                provider=self.provider,
                param="size",
            )
        if shape == "aspect" and not (
            min(width, height) > 0 and max(width, height) / min(width, height) <= _WIDEST + 1e-9
        ):
            raise InvalidParamsError(
                f"size must have an aspect ratio between 21:9 and 9:21 for "
                f"{self.provider_model}, got '{size}'",
                provider=self.provider,
                param="size",
            )
        if self.tunable:
            (low_steps, high_steps), (low_guidance, high_guidance) = _TUNABLE[self.provider_model]
            if params.steps is not None and not low_steps <= params.steps <= high_steps:
                raise InvalidParamsError(
                    f"steps must be {low_steps}..{high_steps} for {self.provider_model}, "
                    f"got {params.steps}",
                    provider=self.provider,
                    param="steps",
                )
            guidance = params.guidance_scale
            if guidance is not None and not low_guidance <= guidance <= high_guidance:
                raise InvalidParamsError(
                    f"guidance_scale must be {low_guidance:g}..{high_guidance:g} for "
                    f"{self.provider_model}, got {guidance:g}",
                    provider=self.provider,
                    param="guidance_scale",
                )
        if params.seed < 0:
            raise InvalidParamsError(
                f"seed must be 0 or more, got {params.seed}", provider=self.provider, param="seed"
            )

    def estimate_cost_usd(self, params: GenerationParams) -> float | None:
        key = self.price_key()
        each = (
            None
            if key is None
            else self.prices.price_per_image(key, size=f"{params.width}x{params.height}")
        )
        return None if each is None else each * params.n

    def _body(self, params: GenerationParams, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": params.prompt,
            "seed": seed,
            "output_format": params.output_format,
        }
        if self.shape == "aspect":
            body["aspect_ratio"] = reduced_ratio(params.width, params.height)
        elif self.shape != "image":
            body["width"], body["height"] = params.width, params.height
        if params.mask is not None:  # Fill: white = repaint, as ours
            body["image"], body["mask"] = b64(params.images[0]), b64(params.mask)
        else:
            for index, image in enumerate(params.images):
                body["input_image" if index == 0 else f"input_image_{index + 1}"] = b64(image)
        if self.tunable:
            if params.steps is not None:
                body["steps"] = params.steps
            if params.guidance_scale is not None:
                body["guidance"] = params.guidance_scale
        return body

    def _dropped(self, params: GenerationParams) -> tuple[str, ...]:
        dropped = params.given(
            "negative_prompt",
            "scheduler",
            "quality",
            "style",
            "background",
            "moderation",
            "output_compression",
        )
        if not self.tunable:
            dropped += params.given("steps", "guidance_scale")
        dropped += params.given("input_fidelity") + self.edit_support().dropped(params)
        return tuple(dropped)

    async def _generate(self, params: GenerationParams, events: Events) -> BackendResult:
        pieces = await fan_out(params.n, lambda i, report: self._task(params, i, report), events)
        notices: tuple[str, ...] = ()
        if self.shape == "aspect":
            notices = (
                f"{self.provider_model} takes an aspect ratio, not a size: "
                f"{params.width}x{params.height} was sent as "
                f"aspect_ratio {reduced_ratio(params.width, params.height)}",
            )
        return BackendResult(
            images=tuple(p.image for p in pieces),
            provider=self.provider,
            cost_usd=total_cost(pieces),
            dropped_params=self._dropped(params),
            notices=notices,
            deterministic=True,
        )

    def _key_headers(self) -> dict[str, str]:
        return {"x-key": self.config.api_key_value() or "", "accept": "application/json"}

    async def _task(self, params: GenerationParams, index: int, report: Report) -> Piece:
        """Image `index` (seed + index): submit, poll the task, download its sample."""
        seed = params.seed + index
        submitted = await self.http.send_json(
            "POST",
            f"{self.config.base_url}/v1/{self.provider_model}",
            what=f"submit {self.provider_model}",
            headers=self._key_headers(),
            json=self._body(params, seed),
        )
        task_id = str(submitted.get("id", ""))
        polling_url = submitted.get("polling_url")
        if not isinstance(polling_url, str) or not polling_url:
            polling_url = f"{self.config.base_url}/v1/get_result?id={task_id}"
        credits = submitted.get("cost")
        charged = 0.0
        if isinstance(credits, int | float) and not isinstance(credits, bool):
            charged = round(float(credits) * USD_PER_CREDIT, 6)
            cost: float | None = charged
        else:
            key = self.price_key()
            cost = (
                None
                if key is None
                else self.prices.price_per_image(key, size=f"{params.width}x{params.height}")
            )
        # Credentials go to the polling host only when it is the provider's own (regional
        # hosts share the registrable domain); a signed result URL needs none.
        headers = (
            self._key_headers()
            if same_site(polling_url, self.config.base_url)
            else {"accept": "application/json"}
        )
        sample = await poll_until(
            self.http,
            polling_url,
            task_id=task_id,
            read=lambda body: self._read_poll(task_id, body, charged),
            report=report,
            headers=headers,
            max_interval=_POLL_MAX_INTERVALS,
        )
        data = await self.http.download(sample, what=f"result download ({task_id})")
        return Piece(to_image(data, provider=self.provider, seed=seed), cost)

    def _read_poll(self, task_id: str, body: dict[str, Any], charged_usd: float) -> Polled[str]:
        """One poll answer: the sample URL once Ready; moderation and failures raise."""
        status = str(body.get("status", ""))
        if status == "Ready":
            result = body.get("result")
            sample = result.get("sample") if isinstance(result, dict) else None
            if not isinstance(sample, str) or not sample:
                raise TransientBackendError(
                    f"bfl: task {task_id} is Ready but has no result.sample",
                    provider=self.provider,
                )
            return Polled(status, result=sample)
        if status in _MODERATED:
            # Only the submit answer's `cost` says a moderated task was charged.
            raise ContentFilteredError(
                f"bfl: the {'prompt' if status.startswith('Request') else 'image'} was "
                f"refused by the provider's moderation ({status})",
                provider=self.provider,
                charged_usd=charged_usd,
            )
        if status in _FAILED:
            raise TransientBackendError(
                f"bfl: task {task_id} failed ({status}){_details(body)}", provider=self.provider
            )
        fraction = body.get("progress")
        if not isinstance(fraction, int | float) or isinstance(fraction, bool):
            return Polled(status)
        return Polled(status, progress=fraction if fraction <= 1 else fraction / 100)


def _details(body: dict[str, Any]) -> str:
    details = body.get("details")
    return f": {str(details)[:200]}" if details else ""


def _with_defaults(
    params: GenerationParams, steps: int | None, guidance: float | None
) -> GenerationParams:
    return replace(
        params,
        steps=params.steps if params.steps is not None else steps,
        guidance_scale=params.guidance_scale if params.guidance_scale is not None else guidance,
    )
