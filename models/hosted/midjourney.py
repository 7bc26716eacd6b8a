"""Midjourney through a self-hosted midjourney-proxy: an UNOFFICIAL bridge to a Midjourney account.

Midjourney has no public API. midjourney-proxy (open source, self-hosted) drives a Midjourney
account through its Discord bot and exposes a small REST protocol; this backend speaks that
protocol. Using it automates a Midjourney account: the account's terms of service apply, and
the account may be limited or banned for it. README note:

    The `midjourney` model is an unofficial bridge: it needs your own midjourney-proxy
    (providers.midjourney.base_url) logged in to your own Midjourney account, which it
    automates. There is no vendor price; set providers.midjourney.usd_per_image to book one.

Protocol: `POST {base}/mj/submit/imagine` {prompt, base64Array, notifyHook, state} -> {code,
description, result}; then `GET {base}/mj/task/{id}/fetch` until SUCCESS or FAILURE; then the
`imageUrl`, one 2x2 grid of four candidates. Negative prompt, aspect ratio and seed travel
inside the prompt as `--no`, `--ar W:H` and `--seed N`.
"""

from __future__ import annotations

import math
from typing import Any

from models.base import (
    BackendError,
    BackendResult,
    ContentFilteredError,
    Events,
    GenerationParams,
    InvalidParamsError,
    TransientBackendError,
)
from models.hosted.backend import HostedBackend
from models.hosted.client import same_site
from models.hosted.inputs import EditSupport
from models.hosted.polling import Polled, poll_until
from models.hosted.results import Piece, Report, fan_out, to_image, total_cost

SEED_MAX = 4_294_967_295
# midjourney-proxy return codes: 1 submitted, 21 already exists, 22 queued, 23 queue full,
# 24 banned prompt; anything else is an error (4 = validation error). Task statuses as the
# proxy names them; CANCEL is final.
_ACCEPTED = frozenset({1, 21, 22})
_QUEUE_FULL = 23
_BANNED = 24
_VALIDATION = 4
_RUNNING = frozenset({"NOT_START", "SUBMITTED", "IN_PROGRESS", "MODAL"})
_BANNED_WORDS_IN_REASON = ("banned", "moderat", "blocked")
# The longest wait between polls, in poll intervals.
_POLL_MAX_INTERVALS = 5.0


def reduced_ratio(width: int, height: int) -> str:
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


def imagine_prompt(params: GenerationParams, seed: int) -> str:
    """The prompt with Midjourney's parameters appended. `--no` goes last: it takes the text
    up to the next `--`, so a `--` inside the negative prompt is removed."""
    text = " ".join(params.prompt.split())
    parts = [text, f"--ar {reduced_ratio(params.width, params.height)}", f"--seed {seed}"]
    if params.negative_prompt:
        negative = " ".join(params.negative_prompt.replace("--", " ").split())
        if negative:
            parts.append(f"--no {negative}")
    return " ".join(parts)


def parse_progress(value: Any) -> int | None:
    """midjourney-proxy reports progress as "37%"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return int(float(value.strip()[:-1]))
        except ValueError:
            return None
    return None


class MidjourneyBackend(HostedBackend):
    needs_key = False  # the proxy's mj-api-secret is optional

    def resolve(self, params: GenerationParams) -> GenerationParams:
        self.require_size_and_seeds(params, seed_max=SEED_MAX)
        return params

    def edit_support(self) -> EditSupport:
        # imagine's base64Array holds image prompts: references a new grid is inspired by, not
        # a picture to edit. Answering an edit with one would be a new picture in disguise.
        return EditSupport(
            why="midjourney-proxy's imagine takes image prompts (base64Array) that inspire a "
            "new picture, not an image to edit; flux-kontext-pro or gpt-image-2 edit one"
        )

    def estimate_cost_usd(self, params: GenerationParams) -> float | None:
        each = self.config.usd_per_image
        return None if each is None else each * params.n

    def _headers(self) -> dict[str, str]:
        secret = self.config.api_key_value()
        return {"mj-api-secret": secret} if secret else {}

    async def _generate(self, params: GenerationParams, events: Events) -> BackendResult:
        pieces = await fan_out(params.n, lambda i, report: self._task(params, i, report), events)
        dropped = params.given(
            "steps",
            "guidance_scale",
            "scheduler",
            "quality",
            "style",
            "background",
            "moderation",
            "output_compression",
        )
        notices = ["midjourney returns one 2x2 grid of four candidates per image"]
        if self.config.usd_per_image is None:
            notices.append(
                f"no cost booked: set providers.{self.provider}.usd_per_image "
                "(Midjourney has no per-image price)"
            )
        if any(p.image.format != params.output_format for p in pieces):
            dropped.append("output_format")
        return BackendResult(
            images=tuple(p.image for p in pieces),
            provider=self.provider,
            cost_usd=total_cost(pieces),
            dropped_params=tuple(dropped),
            notices=tuple(notices),
            # The same seed gives a similar, not an identical, grid.
            deterministic=False,
        )

    async def _task(self, params: GenerationParams, index: int, report: Report) -> Piece:
        """Image `index` (seed + index): imagine, poll the task, download its grid."""
        seed = params.seed + index
        base = self.config.base_url
        submitted = await self.http.send_json(
            "POST",
            f"{base}/mj/submit/imagine",
            what="submit imagine",
            headers=self._headers(),
            json={
                "prompt": imagine_prompt(params, seed),
                "base64Array": [],
                "notifyHook": "",
                "state": "",
            },
        )
        task_id = self._task_id(submitted)
        image_url = await poll_until(
            self.http,
            f"{base}/mj/task/{task_id}/fetch",
            task_id=task_id,
            read=lambda task: self._read_poll(task_id, task),
            report=report,
            headers=self._headers(),
            max_interval=_POLL_MAX_INTERVALS,
        )
        headers = self._headers() if same_site(image_url, base) else {}
        data = await self.http.download(image_url, what=f"image of task {task_id}", headers=headers)
        return Piece(to_image(data, provider=self.provider, seed=seed), self.config.usd_per_image)

    def _task_id(self, submitted: dict[str, Any]) -> str:
        """The task id of an accepted submit; the proxy's refusals raise."""
        code = submitted.get("code")
        description = str(submitted.get("description") or "")[:200]
        if code == _BANNED:
            properties = submitted.get("properties")
            word = properties.get("bannedWord") if isinstance(properties, dict) else None
            raise ContentFilteredError(
                "midjourney: the prompt was refused for a banned word"
                + (f" '{word}'" if word else "")
                + " (code 24)",
                provider=self.provider,
            )
        if code == _QUEUE_FULL:
            raise TransientBackendError(
                f"midjourney: the proxy's queue is full (code 23): {description}",
                provider=self.provider,
            )
        if code == _VALIDATION:
            raise InvalidParamsError(
                f"midjourney: the proxy rejected the request (code 4): {description}",
                provider=self.provider,
                param="prompt",
            )
        if code not in _ACCEPTED:
            raise BackendError(
                f"midjourney: submit failed (code {code}): {description}", provider=self.provider
            )
        task_id = str(submitted.get("result") or "")
        if not task_id:
            raise BackendError(
                "midjourney: submit was accepted but named no task id", provider=self.provider
            )
        return task_id

    def _read_poll(self, task_id: str, task: dict[str, Any]) -> Polled[str]:
        """One fetch answer: the grid's URL on SUCCESS; FAILURE, CANCEL and unknown raise."""
        status = str(task.get("status") or "")
        percent = parse_progress(task.get("progress"))
        progress = None if percent is None else percent / 100
        if status == "SUCCESS":
            url = task.get("imageUrl")
            if not isinstance(url, str) or not url:
                raise TransientBackendError(
                    f"midjourney: task {task_id} succeeded without an imageUrl",
                    provider=self.provider,
                )
            return Polled(status, result=url, progress=progress)
        if status == "FAILURE":
            reason = str(task.get("failReason") or "no reason given")[:200]
            if any(word in reason.lower() for word in _BANNED_WORDS_IN_REASON):
                raise ContentFilteredError(
                    f"midjourney: task {task_id} was refused by moderation: {reason}",
                    provider=self.provider,
                )
            raise TransientBackendError(
                f"midjourney: task {task_id} failed: {reason}", provider=self.provider
            )
        if status == "CANCEL":
            raise TransientBackendError(
                f"midjourney: task {task_id} was cancelled on the proxy", provider=self.provider
            )
        if status not in _RUNNING:
            raise BackendError(
                f"midjourney: task {task_id} has unknown status '{status}'",
                provider=self.provider,
            )
        return Polled(status, progress=progress)
