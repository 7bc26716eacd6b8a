"""Input images (img2img, inpainting, edits): decoded from untrusted bytes, checked, and
normalised into the one form every backend takes (models.base.InputImage), before any model
work.

The checks run in the order that keeps hostile files cheap: the type is sniffed from the
content (never the filename), the size is read from the header and held against the
megapixel cap before a single pixel is decoded (a 20000x20000 PNG is a few kB on the wire and
1.2 GB once decoded), and only then are the pixels loaded.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from models.base import InputImage
from server import errors

if TYPE_CHECKING:  # server.request calls this module: the types only, no import cycle
    from server.request import ImageRequest, MaskConvention, ResizeMode

# What an input may be. Pillow opens far more (PSD, EPS through Ghostscript, ...); the formats
# a browser or camera produces are enough, and every other decoder is attack surface.
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
# Taken from the image when the request names no size: both families' multiple (SDXL 8, Flux 16).
SIZE_MULTIPLE = 16
MAX_IMAGES = 16  # OpenAI's edits API takes up to 16 reference images
# PNG level 1: the normalised image is re-encoded on every request; the bytes are an internal
# hand-over (hosted uploads, the pipeline's decode), where speed matters more than size.
_PNG_LEVEL = 1


@dataclass(frozen=True)
class Inputs:
    """A request's decoded inputs and the size the work runs at."""

    images: tuple[InputImage, ...]
    mask: InputImage | None
    # None in "masked" mode without a requested size: the model's default working size.
    width: int | None
    height: int | None


def decode_inputs(request: ImageRequest, *, max_megapixels: float) -> Inputs | None:
    """The request's images and mask, decoded and checked (None without images). The output
    size: the request's, or the first image's rounded down to a multiple of 16. In "masked"
    inpaint mode the images keep their own size (the work runs on a crop of them at the
    request's size, pasted back), so only the mask's size is checked."""
    if not request.images:
        if request.mask is not None:
            raise errors.InvalidRequestError(
                "mask needs an image: send the image to edit with it", param="mask"
            )
        return None
    if len(request.images) > MAX_IMAGES:
        raise errors.InvalidRequestError(
            f"image: at most {MAX_IMAGES} images per request, got {len(request.images)}",
            param="image",
        )
    opened = [_open(data, "image", max_megapixels) for data in request.images]
    first = opened[0]
    mask_image = _mask_source(request, first, max_megapixels)
    if mask_image is not None and mask_image.size != first.size:
        raise errors.InvalidRequestError(
            f"mask is {mask_image.width}x{mask_image.height} but the image is "
            f"{first.width}x{first.height}; send a mask the size of the image",
            param="mask",
        )
    keep_size = request.inpaint_area == "masked" and mask_image is not None
    width: int | None = request.width
    height: int | None = request.height
    if not (width and height) and not keep_size:
        width, height = _rounded(first.width), _rounded(first.height)
    target = None if keep_size or not (width and height) else (width, height)
    images = tuple(
        _normalised(_fit(img.convert("RGB"), target, request.resize_mode)) for img in opened
    )
    mask = None
    if mask_image is not None:
        fitted = _fit(mask_image, target, request.resize_mode, fill=0)
        if _lowest(ImageOps.invert(fitted)) == 255:  # black everywhere
            raise errors.InvalidRequestError(
                "mask marks nothing to repaint (it is black everywhere; white = repaint"
                + (", or for OpenAI's edits API, transparent = repaint" if _alpha(request) else "")
                + ")",
                param="mask",
            )
        mask = _normalised(fitted)
    return Inputs(images=images, mask=mask, width=width, height=height)


def _alpha(request: ImageRequest) -> bool:
    convention: MaskConvention = request.mask_convention
    return convention == "alpha"


def _mask_source(
    request: ImageRequest, first: Image.Image, max_megapixels: float
) -> Image.Image | None:
    """The mask as mode L, white = repaint, whatever convention the caller used. OpenAI's
    convention: the transparent pixels are the edit area, and without a mask the first
    image's own transparency is the mask (as its API does)."""
    if request.mask is None:
        if _alpha(request) and _has_transparency(first):
            return _from_alpha(first)
        return None
    mask = _open(request.mask, "mask", max_megapixels)
    if _alpha(request):
        if not _has_transparency(mask):
            raise errors.InvalidRequestError(
                "mask has no transparent pixels: the edits API repaints where the mask is "
                "transparent; send a PNG with an alpha channel",
                param="mask",
            )
        return _from_alpha(mask)
    grey = mask.convert("L")
    if request.mask_convention == "black":
        grey = ImageOps.invert(grey)
    if _has_transparency(mask):
        # A mask with alpha: transparent counts as "keep".
        flat = Image.new("L", mask.size, 0)
        flat.paste(grey, mask=mask.convert("RGBA").getchannel("A"))
        return flat
    return grey


def _has_transparency(image: Image.Image) -> bool:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return _lowest(image.convert("RGBA").getchannel("A")) < 255
    return False


def _lowest(band: Image.Image) -> int:
    """The smallest value of a one-band image."""
    lowest, _ = band.getextrema()
    assert isinstance(lowest, int)  # one 8-bit band: (min, max) of ints
    return lowest


def _from_alpha(image: Image.Image) -> Image.Image:
    return ImageOps.invert(image.convert("RGBA").getchannel("A"))


# Pillow's own default, 1 GiB / 4 / 3 (a quarter GiB of RGB): the warning threshold; twice
# it (179 megapixels) is refused before any pixel is decoded, whatever
# server.max_input_megapixels says (which is why that setting stops at 178).
BOMB_GUARD_PIXELS = 89_478_485


def _open(data: bytes, field: str, max_megapixels: float) -> Image.Image:
    """Decode `data` (any accepted type, sniffed from the content) with EXIF orientation
    applied; every failure is a 400 naming `field`."""
    if not data:
        raise errors.InvalidRequestError(f"{field} is empty; send an image file", param=field)
    # Pillow's decompression-bomb guard, set here rather than trusted: it is a process-wide
    # global that any imported library may have turned off (None). Past twice this, Pillow
    # refuses from the header alone.
    Image.MAX_IMAGE_PIXELS = BOMB_GUARD_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past twice its limit raises) on huge images: our own cap,
            # checked next from the header alone, is lower and says which setting to change.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(ACCEPTED_FORMATS))
    except Image.DecompressionBombError:
        # Over twice Pillow's own limit (179 megapixels), refused from the header alone.
        raise _too_big(field, "over 179 megapixels", max_megapixels) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise errors.InvalidRequestError(
            f"{field} is not an image this server reads; send PNG, JPEG, WebP, GIF or BMP",
            param=field,
        ) from None
    megapixels = image.width * image.height / 1e6
    if megapixels > max_megapixels:
        size = f"{image.width}x{image.height}, {megapixels:.1f} megapixels"
        raise _too_big(field, size, max_megapixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
        # EXIF orientation: a phone photo is stored sideways with a tag saying so.
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise errors.InvalidRequestError(
            f"{field} could not be decoded (the file is truncated or corrupt); send the whole "
            "file again",
            param=field,
        ) from None


def _too_big(field: str, size: str, max_megapixels: float) -> errors.InvalidRequestError:
    return errors.InvalidRequestError(
        f"{field} is too large ({size}), over this server's cap of {max_megapixels:g} "
        "megapixels; send a smaller image (the operator sets server.max_input_megapixels)",
        param=field,
    )


def _rounded(side: int) -> int:
    return max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE)


def _fit(
    image: Image.Image, target: tuple[int, int] | None, mode: ResizeMode, *, fill: int = 0
) -> Image.Image:
    """`image` at `target` size by the resize mode (see server.request.ResizeMode)."""
    if target is None or image.size == target:
        return image
    if mode == "stretch":
        return image.resize(target, Image.Resampling.LANCZOS)
    if mode == "crop":
        return ImageOps.fit(image, target, Image.Resampling.LANCZOS)
    # "pad": fit inside, bars in the edge colour for images (a neutral continuation the model
    # can repaint) and `fill` (keep) for masks.
    contained = ImageOps.contain(image, target, Image.Resampling.LANCZOS)
    color: int | tuple[int, ...] = fill if image.mode == "L" else _edge(contained)
    return ImageOps.pad(contained, target, Image.Resampling.LANCZOS, color=color)


def _edge(image: Image.Image) -> tuple[int, ...]:
    # The image's mean colour: close enough to the edge colour for bars, and one cheap call.
    small = image.resize((1, 1), Image.Resampling.BOX)
    pixel = small.getpixel((0, 0))
    return tuple(pixel) if isinstance(pixel, tuple) else (int(pixel or 0),) * 3


def _normalised(image: Image.Image) -> InputImage:
    """The hand-over form: PNG bytes, and a hash of the pixels themselves (mode, size, raw
    bytes) rather than of the PNG, so the key does not change with the encoder's version."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=_PNG_LEVEL)
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return InputImage(
        data=buf.getvalue(), sha256=digest.hexdigest(), width=image.width, height=image.height
    )
