"""A request's input images as the local pipelines take them (decoded, cropped for "only masked"
inpainting) and the paste-back after decoding that keeps every pixel outside the mask the
original's."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from models.base import GenerationParams, InputImage

Box = tuple[int, int, int, int]  # left, top, right, bottom (PIL's crop box)


@dataclass(frozen=True)
class EditInput:
    """One request's inputs at the working size (the request's width x height), and what the
    paste-back needs: the original at its own size and the share of generated pixels per
    pixel (the mask, feathered by mask_blur)."""

    image: Any  # PIL RGB, working size
    mask: Any = None  # PIL L, working size; inpainting only
    original: Any = None  # HxWx3 uint8 of the input at its own size; inpainting only
    blend: Any = None  # HxW float32 in [0, 1]; 0 keeps the original's pixel exactly
    box: Box | None = None  # the crop of "masked" mode, in the original's pixels

    def paste_back(self, generated: Any) -> Any:
        """The output (HxWx3 uint8 at the input's size) from a generated working-size image:
        unchanged for img2img; for inpainting the original where the mask is 0, the generated
        pixels where it is 255, a blend in between (the feather)."""
        if self.original is None:
            return generated
        import numpy as np
        from PIL import Image

        if self.box is None:
            full = generated
        else:
            left, top, right, bottom = self.box
            patch = Image.fromarray(generated).resize(
                (right - left, bottom - top), Image.Resampling.LANCZOS
            )
            full = self.original.copy()
            full[top:bottom, left:right] = np.asarray(patch)
        share = self.blend[..., None]
        mixed = self.original * (1.0 - share) + full.astype(np.float32) * share
        out = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
        # Where the mask is 0 the original's bytes, not a float round trip of them.
        return np.where(share > 0, out, self.original)


def decode(image: InputImage, mode: str) -> Any:
    """The PIL image behind `image`: the edge normalised it already (RGB, or L for a mask);
    the conversion only guards against a caller that did not."""
    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as opened:
        return opened.convert(mode)


def prepare(params: GenerationParams) -> EditInput | None:
    """The inputs of one request (None for text-to-image). Local pipelines take the first
    image; OpenAI's several reference images are for the hosted edits API."""
    if not params.images:
        return None
    import numpy as np
    from PIL import Image, ImageFilter

    image = decode(params.images[0], "RGB")
    if params.mask is None:
        return EditInput(image=image)
    mask = decode(params.mask, "L")
    if params.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(params.mask_blur))
    original = np.asarray(image)
    blend = np.asarray(mask, dtype=np.float32) / 255.0
    size = (params.width, params.height)
    if params.inpaint_area == "whole":
        return EditInput(image=image, mask=mask, original=original, blend=blend)
    box = crop_box(np.asarray(mask), params.inpaint_padding, size)
    return EditInput(
        image=image.crop(box).resize(size, Image.Resampling.LANCZOS),
        mask=mask.crop(box).resize(size, Image.Resampling.BILINEAR),
        original=original,
        blend=blend,
        box=box,
    )


def crop_box(mask: Any, padding: int, working: tuple[int, int]) -> Box:
    """The box around the mask's nonzero pixels, `padding` wider on every side and grown to
    the working size's aspect ratio (so the crop is scaled, never stretched), inside the
    image. An empty mask repaints nothing: the whole image is the box."""
    import numpy as np

    height, width = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, width, height)
    left, right = _grow(int(cols[0]) - padding, int(cols[-1]) + 1 + padding, width)
    top, bottom = _grow(int(rows[0]) - padding, int(rows[-1]) + 1 + padding, height)
    ratio = working[0] / working[1]
    if (right - left) / (bottom - top) < ratio:
        left, right = _grow_to(left, right, round((bottom - top) * ratio), width)
    else:
        top, bottom = _grow_to(top, bottom, round((right - left) / ratio), height)
    return (left, top, right, bottom)


def _grow(start: int, end: int, limit: int) -> tuple[int, int]:
    return max(start, 0), min(end, limit)


def _grow_to(start: int, end: int, length: int, limit: int) -> tuple[int, int]:
    """[start, end) widened about its centre to `length` (at most `limit`), shifted back
    inside [0, limit) where it would cross an edge."""
    length = min(length, limit)
    start -= (length - (end - start)) // 2
    start = min(max(start, 0), limit - length)
    return start, start + length
