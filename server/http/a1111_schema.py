"""The A1111 /sdapi/v1 wire schema: txt2img and img2img bodies as A1111's clients send them
(every field optional, unknown keys and nulls accepted), read into the service's ImageRequest,
with the keys that had no effect named; and A1111's sampler names mapped to our schedulers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from server import errors
from server.http.errors import NotFoundError
from server.request import MAX_N, ImageRequest, ResizeMode
from server.request_schema import MAX_JSON_DEPTH, base64_image, deeper_than, unencodable_at
from server.samplers import A1111_SAMPLERS

# A1111's resize_mode numbers: 0 "Just resize", 1 "Crop and resize", 2 "Resize and fill",
# 3 "Just resize (latent upscale)" (a plain resize here: there is no latent upscaler).
RESIZE_MODES: dict[int, ResizeMode] = {0: "stretch", 1: "crop", 2: "pad", 3: "stretch"}
# A1111's defaults where ours differ, applied only when the client leaves the field out.
A1111_MASK_BLUR = 4
A1111_DENOISING_STRENGTH = 0.75
# The scheduler value that means "the sampler's own" (webuiapi sends it lowercase).
AUTOMATIC = "automatic"

_BY_A1111_NAME = {a1111.lower(): ours for ours, a1111 in A1111_SAMPLERS.items()}


def scheduler_for(sampler: str | None, scheduler: str | None) -> tuple[str | None, bool]:
    """Our scheduler for A1111's sampler and scheduler names, and whether the scheduler name
    was left unused. A1111 splits "DPM++ 2M Karras" into sampler + scheduler: "DPM++ 2M" with
    scheduler "karras" is the same choice. An unknown sampler is A1111's 404."""
    wanted = (scheduler or "").strip().lower()
    used_scheduler = wanted in ("", AUTOMATIC)
    if not sampler or not sampler.strip():
        return None, not used_scheduler
    name = sampler.strip().lower()
    if not used_scheduler:
        combined = _BY_A1111_NAME.get(f"{name} {wanted}")
        if combined is not None:
            return combined, False
    ours = _BY_A1111_NAME.get(name) or (name if name in A1111_SAMPLERS else None)
    if ours is None:
        known = ", ".join(sorted(A1111_SAMPLERS.values()))
        raise NotFoundError(
            f"Sampler not found: '{sampler}'; use one of {known} (GET /sdapi/v1/samplers)",
            param="sampler_name",
        )
    return ours, not used_scheduler


def _given(value: Any) -> bool:
    """Whether a key's value asks for anything (null, false and empties are defaults)."""
    return value not in (None, False, "", [], {})


class Txt2ImgBody(BaseModel):
    """POST /sdapi/v1/txt2img. Like A1111's own generated models: every field optional and
    unknown keys kept (hires fix, restore faces, scripts, SillyTavern's url/auth ...), so
    every client's body validates; `ignored()` names what had no effect."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int | None = None
    n_iter: int | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool | None = None
    force_task_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _writable(cls, data: Any) -> Any:
        # Every key is kept and echoed back in "parameters", so every text in the body (not
        # only the prompt) must be one UTF-8 can write: a lone surrogate ("\ud800") is refused
        # here, naming where it is, not left to fail the tokenizer or the response (a 500).
        where = unencodable_at(data)
        if where is not None:
            raise PydanticCustomError(
                "unicode_surrogate",
                "{field} must be text UTF-8 can encode: it holds a lone surrogate; send the "
                "character itself, or both halves of a surrogate pair",
                {"field": where},
            )
        if deeper_than(data, MAX_JSON_DEPTH + 1):
            raise PydanticCustomError(
                "json_depth",
                "the request body nests arrays/objects more than {limit} levels deep; no field "
                "of txt2img or img2img needs that many, send a flatter body",
                {"limit": MAX_JSON_DEPTH},
            )
        return data

    @property
    def images_wanted(self) -> int:
        return (self.batch_size or 1) * (self.n_iter or 1)

    def checkpoint(self) -> str | None:
        value = (self.override_settings or {}).get("sd_model_checkpoint")
        return str(value) if _given(value) else None

    def ignored(self) -> list[str]:
        """The keys sent with a value that changed nothing here."""
        names = [key for key, value in (self.model_extra or {}).items() if _given(value)]
        for key, value in (self.override_settings or {}).items():
            if key != "sd_model_checkpoint" and _given(value):
                names.append(f"override_settings.{key}")
        _, scheduler_unused = scheduler_for(self.sampler_name or self.sampler_index, self.scheduler)
        if scheduler_unused:
            names.append("scheduler")
        return sorted(names)

    def echo(self) -> dict[str, Any]:
        """The request as A1111 echoes it back in "parameters"."""
        return self.model_dump()

    def to_image_request(self, *, model: str | None, request_id: str | None) -> ImageRequest:
        n = self.images_wanted
        if not 1 <= n <= MAX_N:
            raise errors.InvalidRequestError(
                f"batch_size x n_iter must make 1 to {MAX_N} images per request, got "
                f"{self.batch_size or 1} x {self.n_iter or 1} = {n}; send fewer per call",
                param="batch_size",
            )
        scheduler, _ = scheduler_for(self.sampler_name or self.sampler_index, self.scheduler)
        return ImageRequest(
            prompt=self.prompt or "",
            model=model,
            negative_prompt=self.negative_prompt or None,
            width=self.width or None,
            height=self.height or None,
            n=n,
            # -1 (and any negative) is A1111's "random".
            seed=self.seed if self.seed is not None and self.seed >= 0 else None,
            steps=self.steps or None,
            guidance_scale=self.cfg_scale,
            scheduler=scheduler,
            request_id=request_id,
            **self._image_fields(),
        )

    def _image_fields(self) -> dict[str, Any]:
        return {}


class Img2ImgBody(Txt2ImgBody):
    """POST /sdapi/v1/img2img: the txt2img fields and the input image, mask and their
    handling."""

    init_images: list[str] | None = None
    mask: str | None = None
    inpainting_mask_invert: int | None = None
    mask_blur: int | None = None
    inpaint_full_res: bool | None = None
    inpaint_full_res_padding: int | None = None
    denoising_strength: float | None = None
    resize_mode: int | None = None
    include_init_images: bool | None = None

    def echo(self) -> dict[str, Any]:
        # A1111 echoes the images only when include_init_images asks for them.
        echoed = super().echo()
        if not self.include_init_images:
            echoed["init_images"] = None
            echoed["mask"] = None
        return echoed

    def _image_fields(self) -> dict[str, Any]:
        texts = [t for t in self.init_images or [] if t]
        if not texts:
            raise errors.InvalidRequestError(
                "init_images is required on img2img: send the image as base64 (raw or a data: "
                "URL) in a list, or call /sdapi/v1/txt2img",
                param="init_images",
            )
        if self.resize_mode is not None and self.resize_mode not in RESIZE_MODES:
            raise errors.InvalidRequestError(
                f"resize_mode must be 0 (just resize), 1 (crop and resize), 2 (resize and "
                f"fill) or 3, got {self.resize_mode}",
                param="resize_mode",
            )
        mask = base64_image(self.mask, param="mask") if self.mask else None
        # A1111's default is "only masked" (inpaint_full_res true).
        masked = mask is not None and self.inpaint_full_res is not False
        strength = self.denoising_strength
        return {
            "images": tuple(base64_image(t, param="init_images") for t in texts),
            "mask": mask,
            # Inverted (black = repaint) is decoded, under the megapixel cap, by server.inputs.
            "mask_convention": "black" if self.inpainting_mask_invert else "white",
            "strength": strength if strength is not None else A1111_DENOISING_STRENGTH,
            "mask_blur": (
                (self.mask_blur if self.mask_blur is not None else A1111_MASK_BLUR)
                if mask is not None
                else 0
            ),
            "inpaint_area": "masked" if masked else "whole",
            "inpaint_padding": (self.inpaint_full_res_padding or 0) if masked else 32,
            "resize_mode": RESIZE_MODES[self.resize_mode or 0],
        }
