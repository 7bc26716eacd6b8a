"""Stability AI v2beta Stable Image (`POST /v2beta/stable-image/generate/{ultra|core|sd3}`, and
`/v2beta/stable-image/edit/inpaint`).

Multipart form even without files, `accept: application/json`. One image per call (n > 1 makes
n calls with seeds s+i). Stability takes an aspect ratio, not a size: the request's size maps
to the nearest supported ratio and the mapping is reported.

Image inputs: Ultra and the sd3 models take one init image with a `strength` (sd3 in
`mode=image-to-image`); the output takes the image's own size, so no aspect ratio is sent.
Inpainting is its own endpoint (a catalogue entry with endpoint "inpaint"): image + mask,
whose white is what is repainted, as ours; it has no strength. Core takes no image. The
search-and-replace tool needs a `search_prompt`, which imagegen requests have no field for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
from models.hosted.client import json_object, provider_message, scrub
from models.hosted.inputs import EditSupport, png_file
from models.hosted.results import Piece, decode_b64, fan_out, to_image, total_cost

ASPECT_RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
SEED_MAX = 4_294_967_294  # 0 means "random" to Stability
ENDPOINTS = ("ultra", "core", "sd3", "inpaint")
# Stability requires a strength with an init image; None asks for the backend's default, the
# one the issue names for img2img everywhere.
DEFAULT_STRENGTH = 0.75
_IMG2IMG = EditSupport(
    tasks=frozenset({"txt2img", "img2img"}),
    max_images=1,
    strength=True,
    why="Stability's image-to-image takes one image and no mask; use stability-inpaint",
)
_EDITS: Mapping[str, EditSupport] = {
    "ultra": _IMG2IMG,
    "sd3": _IMG2IMG,
    "core": EditSupport(
        why="Stable Image Core has no image-to-image mode; stability-ultra and the sd3.5 "
        "models take an init image, stability-inpaint a mask"
    ),
    "inpaint": EditSupport(
        tasks=frozenset({"inpaint"}),
        max_images=1,
        why="Stability's inpaint endpoint needs one image and a mask",
    ),
}


def nearest_aspect_ratio(width: int, height: int) -> tuple[str, bool]:
    """The supported ratio closest to width:height (in log space, so 2:1 and 1:2 are equally
    far from 1:1), and whether it is exact."""

    def distance(ratio: str) -> float:
        a, b = (int(x) for x in ratio.split(":"))
        return abs(math.log(width / height) - math.log(a / b))

    best = min(ASPECT_RATIOS, key=distance)
    a, b = (int(x) for x in best.split(":"))
    return best, width * b == height * a


class StabilityBackend(HostedBackend):
    @property
    def endpoint(self) -> str:
        explicit = self.spec.extra.get("endpoint")
        if isinstance(explicit, str) and explicit in ENDPOINTS:
            return explicit
        return self.provider_model if self.provider_model in ("ultra", "core") else "sd3"

    def identity_extra(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint}

    def reproducible(self, params: GenerationParams) -> bool:
        # Stability reads seed 0 as "random"; any other seed repeats its image.
        return 0 not in params.image_seeds()

    def edit_support(self) -> EditSupport:
        return _EDITS[self.endpoint]

    @property
    def path(self) -> str:
        if self.endpoint == "inpaint":
            return "/v2beta/stable-image/edit/inpaint"
        return f"/v2beta/stable-image/generate/{self.endpoint}"

    def resolve(self, params: GenerationParams) -> GenerationParams:
        self.require_size_and_seeds(params, seed_max=SEED_MAX)
        return params

    def estimate_cost_usd(self, params: GenerationParams) -> float | None:
        each = self._price_each()
        return None if each is None else each * params.n

    def _price_each(self) -> float | None:
        key = self.price_key()
        return None if key is None else self.prices.price_per_image(key)

    async def _generate(self, params: GenerationParams, events: Events) -> BackendResult:
        ratio, exact = nearest_aspect_ratio(params.width, params.height)
        dropped: list[str] = self.edit_support().dropped(params)
        notices: list[str] = []
        if params.images:
            ratio = ""  # the output takes the input image's size
        elif not exact:
            dropped += ["width", "height"]
            notices.append(
                f"stability takes an aspect ratio, not a size: {params.width}x{params.height} "
                f"was sent as aspect_ratio {ratio}"
            )
        sd3 = self.endpoint == "sd3"
        dropped += params.given(
            "steps",
            "scheduler",
            "quality",
            "background",
            "moderation",
            "output_compression",
            "input_fidelity",
        )
        if params.guidance_scale is not None and not sd3:
            dropped.append("guidance_scale")
        seeds = params.image_seeds()
        if 0 in seeds:
            notices.append("seed 0 means 'random' to Stability: that image is not reproducible")

        pieces = await fan_out(
            params.n, lambda i, _report: self._one(params, seeds[i], ratio, sd3), events
        )
        return BackendResult(
            images=tuple(p.image for p in pieces),
            provider=self.provider,
            cost_usd=total_cost(pieces),
            dropped_params=tuple(dropped),
            notices=tuple(notices),
            deterministic=0 not in seeds,
        )

    async def _one(self, params: GenerationParams, seed: int, ratio: str, sd3: bool) -> Piece:
        fields: dict[str, str] = {
            "prompt": params.prompt,
            "seed": str(seed),
            "output_format": params.output_format,
        }
        files: dict[str, tuple[str, bytes, str]] = {}
        if ratio:
            fields["aspect_ratio"] = ratio
        if params.images:
            files["image"] = png_file(params.images[0], "image")
        if params.mask is not None:
            files["mask"] = png_file(params.mask, "mask")
        elif params.images:
            strength = DEFAULT_STRENGTH if params.strength is None else params.strength
            fields["strength"] = f"{strength:g}"
            if sd3:
                fields["mode"] = "image-to-image"
        if params.negative_prompt:
            fields["negative_prompt"] = params.negative_prompt
        if params.style is not None:
            fields["style_preset"] = params.style
        if sd3:
            fields["model"] = self.provider_model
            if params.guidance_scale is not None:
                fields["cfg_scale"] = f"{params.guidance_scale:g}"
        # (None, value) parts make httpx send multipart/form-data with no file at all.
        multipart: dict[str, Any] = {name: (None, value) for name, value in fields.items()}
        body = await self.http.send_json(
            "POST",
            f"{self.config.base_url}{self.path}",
            what=self.path.removeprefix("/v2beta/stable-image/"),
            headers={
                "authorization": f"Bearer {self.config.api_key_value()}",
                "accept": "application/json",
            },
            files=multipart | files,
            on_error=self._on_error,
        )
        price = self._price_each()
        finish = body.get("finish_reason")
        if finish == "CONTENT_FILTERED":
            # A 200 with a blurred image: a completed (so presumably billed) generation.
            raise ContentFilteredError(
                "stability: the image was filtered by the provider's moderation "
                "(finish_reason CONTENT_FILTERED)",
                provider=self.provider,
                charged_usd=price or 0.0,
            )
        if finish not in (None, "SUCCESS"):
            raise BackendError(
                f"stability: generation finished with '{finish}'", provider=self.provider
            )
        data = decode_b64(body.get("image"), self.provider)
        returned_seed = body.get("seed")
        image_seed = returned_seed if isinstance(returned_seed, int) else seed
        return Piece(to_image(data, provider=self.provider, seed=image_seed), price)

    def _on_error(self, response: httpx.Response) -> BackendError | None:
        if response.status_code == 403 and _error_name(response) == "content_moderation":
            return ContentFilteredError(
                "stability: the request was refused by the provider's moderation "
                f"(403 content_moderation): {scrub(provider_message(response), self.config)}",
                provider=self.provider,
            )
        if response.status_code == 413:
            return InvalidParamsError(
                "stability: the request is over 10 MiB (413)", provider=self.provider
            )
        return None


def _error_name(response: httpx.Response) -> str | None:
    try:
        body = json_object(response, "stability", "error")
    except BackendError:
        return None
    name = body.get("name")
    return name if isinstance(name, str) else None
