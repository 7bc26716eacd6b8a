"""Another imagegen server as a backend, through its OpenAI-compatible images API.

`POST {base}/v1/images/generations` with imagegen's extension fields (`negative_prompt`,
`seed`, `steps`, `guidance_scale`, `scheduler`), so nothing is lost on the way: the answer
carries each image's seed and an `imagegen` object with the remote cost, cache status and
dropped params. The remote model name is the catalogue entry's `provider_model`.

An edit (image inputs) goes to `POST {base}/v1/images/edits` as multipart, the way the OpenAI
API defines it (`image` or repeated `image[]`, the mask with transparent = edit area, every
number a string) plus the extension fields and `strength` as form fields. Whether the remote
model takes the edit is the remote's to say: its 400 names what it lacks.
"""

from __future__ import annotations

from typing import Any

import httpx

from models.base import (
    BackendError,
    BackendResult,
    ContentFilteredError,
    Events,
    GenerationParams,
    InvalidParamsError,
)
from models.hosted.backend import HostedBackend
from models.hosted.client import scrub
from models.hosted.inputs import EditSupport, alpha_mask, png_file
from models.hosted.results import decode_b64, to_image

_MODERATION_CODES = frozenset(
    {"content_policy_violation", "moderation_blocked", "content_filtered"}
)
_OPTIONAL_FIELDS = (
    "negative_prompt",
    "steps",
    "guidance_scale",
    "scheduler",
    "quality",
    "style",
    "background",
    "moderation",
    "output_compression",
)
# What the edits form carries beyond prompt, model, n, size and the files: OpenAI's edit fields
# and imagegen's extensions. style and moderation are generation-only fields.
_EDIT_FIELDS = (
    "negative_prompt",
    "steps",
    "guidance_scale",
    "scheduler",
    "strength",
    "quality",
    "background",
    "output_compression",
    "input_fidelity",
)
_EDITS = EditSupport(
    tasks=frozenset({"txt2img", "img2img", "inpaint"}),
    max_images=16,  # what the OpenAI edits shape takes
    strength=True,
    why="the OpenAI edits shape takes up to 16 images",
)


def api_base(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def _error_fields(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


class RemoteImagegenBackend(HostedBackend):
    needs_key = False  # a server on a private network may run without API keys
    reads_prompt_weights = True  # the other server parses and weights the prompt itself

    def resolve(self, params: GenerationParams) -> GenerationParams:
        if params.width <= 0 or params.height <= 0 or params.n < 1:
            raise InvalidParamsError(
                f"size must be WIDTHxHEIGHT with positive sides and n at least 1, got "
                f"'{params.width}x{params.height}', n={params.n}",
                provider=self.provider,
                param="size" if params.n >= 1 else "n",
            )
        return params

    def edit_support(self) -> EditSupport:
        return _EDITS

    def _form(self, params: GenerationParams) -> tuple[list[tuple[str, Any]], list[str]]:
        """The multipart parts of an edit (fields as strings, then files) and the params the
        edits form has no field for."""
        fields: dict[str, Any] = {
            "model": self.provider_model,
            "prompt": params.prompt,
            "n": str(params.n),
            "size": f"{params.width}x{params.height}",
            "seed": str(params.seed),
            "output_format": params.output_format,
            "response_format": "b64_json",
        }
        for name in _EDIT_FIELDS:
            value = getattr(params, name)
            if value is not None:
                fields[name] = f"{value:g}" if isinstance(value, float) else str(value)
        parts: list[tuple[str, Any]] = [(name, (None, value)) for name, value in fields.items()]
        image_field = "image" if len(params.images) == 1 else "image[]"
        parts += [
            (image_field, png_file(image, f"image-{i}")) for i, image in enumerate(params.images)
        ]
        if params.mask is not None:
            parts.append(("mask", ("mask.png", alpha_mask(params.mask), "image/png")))
        dropped = params.given("style", "moderation") + _EDITS.dropped(params)
        return parts, dropped

    def _body(self, params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.provider_model,
            "prompt": params.prompt,
            "n": params.n,
            "size": f"{params.width}x{params.height}",
            "seed": params.seed,
            "output_format": params.output_format,
            "response_format": "b64_json",
        }
        for name in _OPTIONAL_FIELDS:
            value = getattr(params, name)
            if value is not None:
                body[name] = value
        return body

    async def _generate(self, params: GenerationParams, events: Events) -> BackendResult:
        key = self.config.api_key_value()
        headers = {"accept": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        route = "edits" if params.images else "generations"
        unsent: list[str] = []
        if params.images:
            files, unsent = self._form(params)
            request: dict[str, Any] = {"files": files}
        else:
            request = {"json": self._body(params)}
        answer = await self.http.send_json(
            "POST",
            f"{api_base(self.config.base_url)}/images/{route}",
            what=f"images/{route} ({self.provider_model})",
            headers=headers,
            on_error=self._on_error,
            **request,
        )
        items = answer.get("data")
        if not isinstance(items, list) or not items:
            raise BackendError(
                "imagegen: the remote answer carries no images", provider=self.provider
            )
        images = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise BackendError("imagegen: malformed data[] item", provider=self.provider)
            seed = item.get("seed")
            images.append(
                to_image(
                    decode_b64(item.get("b64_json"), self.provider),
                    provider=self.provider,
                    seed=seed if isinstance(seed, int) else params.seed + index,
                )
            )
        meta = answer.get("imagegen")
        meta = meta if isinstance(meta, dict) else {}
        dropped = tuple(unsent) + tuple(str(p) for p in meta.get("dropped_params") or ())
        cost = meta.get("cost_usd")
        notices: list[str] = []
        if meta.get("cached"):
            notices.append(
                f"served from the cache of the imagegen server at {self.config.host}"
                + (f" (request {meta['request_id']})" if meta.get("request_id") else "")
            )
        events.progress(100, 100)  # one call makes every image
        revised = items[0].get("revised_prompt")
        return BackendResult(
            images=tuple(images),
            provider=self.provider,
            # The remote already turned its GPU time into cost_usd; its gpu_seconds were not
            # spent here and are not booked again.
            cost_usd=float(cost) if isinstance(cost, int | float) else None,
            # What the remote server made of the prompt (its preset, its sanitizer).
            revised_prompt=revised if isinstance(revised, str) and revised else None,
            dropped_params=dropped,
            notices=tuple(notices),
            deterministic="seed" not in dropped,
        )

    def _on_error(self, response: httpx.Response) -> BackendError | None:
        error = _error_fields(response)
        code = error.get("code")
        message = scrub(str(error.get("message") or ""), self.config)[:300]
        param = error.get("param") if isinstance(error.get("param"), str) else None
        status = response.status_code
        if code in _MODERATION_CODES:
            return ContentFilteredError(
                f"imagegen: the remote server refused the content ({code}): {message}",
                provider=self.provider,
            )
        if status in (400, 404) and (code == "model_not_found" or param == "model"):
            return InvalidParamsError(
                f"imagegen: the server at {self.config.host} has no model "
                f"'{self.provider_model}' ({message}); check the catalogue entry's "
                "provider_model",
                provider=self.provider,
                param="model",
            )
        if status in (400, 413, 422) and error:
            return InvalidParamsError(
                f"imagegen: the remote server rejected the request ({status}): {message}",
                provider=self.provider,
                param=param,
            )
        return None
