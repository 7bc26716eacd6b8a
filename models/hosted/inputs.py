"""Image inputs on the way to hosted providers: which edits a model takes (and why it refuses
the others), what a provider drops of our edit fields, and the encodings providers want
(base64, OpenAI's transparent-is-edit mask)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from models.base import GenerationParams, InputImage, Task

_TASK_NAMES = {
    "txt2img": "text-to-image",
    "img2img": "image inputs without a mask (img2img, edits by instruction)",
    "inpaint": "a mask (inpainting)",
}


@dataclass(frozen=True)
class EditSupport:
    """What one hosted model takes: its tasks, how many input images at most, and whether
    its API has a strength (the share of the schedule re-run). `why` ends every refusal: what
    the provider's API lacks, and where to go instead."""

    tasks: frozenset[Task] = frozenset({"txt2img"})
    max_images: int = 0
    strength: bool = False
    why: str = ""

    def unsupported(self, model: str, params: GenerationParams) -> str | None:
        # LoRA files live in this server's library; a hosted provider cannot load them.
        if params.loras:
            return (
                f"model '{model}' is hosted and takes no LoRA adapters (they run on local "
                "models only); drop loras or pick a local sdxl/flux model"
            )
        task = params.task
        suffix = f" ({self.why})" if self.why else ""
        if task not in self.tasks:
            return f"model '{model}' does not take {_TASK_NAMES[task]}{suffix}"
        if len(params.images) > self.max_images:
            return (
                f"model '{model}' takes at most {self.max_images} input image"
                f"{'s' if self.max_images != 1 else ''}, got {len(params.images)}"
            )
        return None

    def dropped(self, params: GenerationParams) -> list[str]:
        """Our edit fields this model ignores: the strength where its API has none, and the
        local paste-back knobs (providers return their whole picture; nothing is pasted)."""
        if not params.images:
            return []
        dropped = []
        if params.strength is not None and not self.strength:
            dropped.append("strength")
        if params.mask is not None and params.mask_blur:
            dropped.append("mask_blur")
        if params.mask is not None and params.inpaint_area != "whole":
            dropped.append("inpaint_area")
        return dropped


TEXT_ONLY = EditSupport()


def b64(image: InputImage) -> str:
    return base64.b64encode(image.data).decode("ascii")


def png_file(image: InputImage, name: str) -> tuple[str, bytes, str]:
    """A multipart file part (filename, bytes, type): the edge re-encoded every input as PNG."""
    return (f"{name}.png", image.data, "image/png")


def alpha_mask(mask: InputImage) -> bytes:
    """Our mask (mode L, white = repaint) as OpenAI's: a PNG whose fully transparent pixels
    are the edit area. Alpha = 255 - L, so grey feathering keeps its meaning and the
    conversion inverts exactly."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(mask.data)) as img:
        luminance = img.convert("L")
    rgba = Image.new("RGBA", luminance.size, (0, 0, 0, 255))
    rgba.putalpha(ImageOps.invert(luminance))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    return buffer.getvalue()
