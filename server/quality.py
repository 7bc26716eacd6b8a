"""Image quality control: reject broken frames, measure simple statistics, hash for duplicates."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from PIL import Image

# A frame is "all black" when no channel anywhere rises above 2/255 (JPEG/WebP ringing and
# dithering leave a level or two on a truly black frame), or when mean luminance is under 1:
# that is what the fp16 SDXL VAE overflow and blanked (safety-checked) outputs look like.
# Both are worth one retry with the VAE upcast to fp32, so they are `retryable`.
_BLACK_MAX_LEVEL = 2
_BLACK_MEAN_LUMINANCE = 1.0

# Luminance std under 2 levels (of 255) is below what a viewer reads as structure. It is only
# flagged, not failed: a prompt may honestly ask for a plain backdrop or a solid swatch, and a
# real model failure of this kind is rare enough that a human should look before we refuse it.
_NEAR_UNIFORM_CONTRAST = 2.0

# pHash: a 32x32 grayscale thumbnail, its 2-D DCT, and the top-left 8x8 low frequencies.
_PHASH_SIZE = 32
_PHASH_LOW = 8
# Coefficients this close to the median count as "not above", so flat images hash to zeros
# rather than to float rounding noise.
_PHASH_TIE = 1e-6

# ITU-R BT.601 luma, the weights Pillow's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114])

_FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff"}

FloatArray = npt.NDArray[np.float64]
ByteArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class QualityReport:
    ok: bool
    reason: str | None
    retryable: bool
    flagged: tuple[str, ...]
    brightness: float
    contrast: float
    sharpness: float
    phash: str

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "reason": self.reason,
            "retryable": self.retryable,
            "flagged": list(self.flagged),
            "brightness": self.brightness,
            "contrast": self.contrast,
            "sharpness": self.sharpness,
            "phash": self.phash,
        }


def _normalise_format(name: str) -> str:
    lowered = name.strip().lower()
    return _FORMAT_ALIASES.get(lowered, lowered)


def _luminance(rgb: ByteArray) -> FloatArray:
    return np.asarray(rgb.astype(np.float64) @ _LUMA, dtype=np.float64)


def _laplacian_variance(lum: FloatArray) -> float:
    if lum.shape[0] < 3 or lum.shape[1] < 3:
        return 0.0
    # 4-neighbour Laplacian on the interior; borders are skipped rather than padded so padding
    # does not invent edges.
    lap = lum[:-2, 1:-1] + lum[2:, 1:-1] + lum[1:-1, :-2] + lum[1:-1, 2:] - 4.0 * lum[1:-1, 1:-1]
    return float(lap.var())


@lru_cache(maxsize=1)
def _dct_matrix(n: int) -> FloatArray:
    """Orthonormal DCT-II matrix: D @ x is the DCT of column vector x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0, :] = np.sqrt(1.0 / n)
    return np.asarray(matrix, dtype=np.float64)


def _phash(rgb: ByteArray) -> str:
    thumb = (
        Image.fromarray(rgb)  # HxWx3 uint8 is RGB
        .convert("L")
        .resize((_PHASH_SIZE, _PHASH_SIZE), Image.Resampling.LANCZOS)
    )
    gray = np.asarray(thumb, dtype=np.float64)
    dct = _dct_matrix(_PHASH_SIZE)
    low = (dct @ gray @ dct.T)[:_PHASH_LOW, :_PHASH_LOW].flatten()
    # The DC term is mean brightness, not structure: it is left out of the median and its bit
    # is always 0, so a brightness shift alone cannot move the hash.
    median = float(np.median(low[1:]))
    bits = low - median > _PHASH_TIE
    bits[0] = False
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def _analyse(rgb: ByteArray, *, failure: str | None, retryable: bool) -> QualityReport:
    """Statistics for decoded pixels; `failure` is a reason already found upstream."""
    lum = _luminance(rgb)
    brightness = float(lum.mean())
    contrast = float(lum.std())
    reason = failure
    if reason is None and (
        int(rgb.max()) <= _BLACK_MAX_LEVEL or brightness < _BLACK_MEAN_LUMINANCE
    ):
        reason, retryable = "all-black frame", True
    flagged = ("near-uniform",) if contrast < _NEAR_UNIFORM_CONTRAST else ()
    return QualityReport(
        ok=reason is None,
        reason=reason,
        retryable=retryable if reason is not None else False,
        flagged=flagged,
        brightness=brightness,
        contrast=contrast,
        sharpness=_laplacian_variance(lum),
        phash=_phash(rgb),
    )


def check_pixels(rgb: ByteArray, *, width: int, height: int) -> QualityReport:
    """Check 8-bit RGB pixels (HxWx3) that a backend encoded itself against the requested
    size: the checks of `check_image` without decoding the file again."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"pixels must be an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}")
    failure = None
    if rgb.shape[:2] != (height, width):
        failure = f"size mismatch: expected {width}x{height}, got {rgb.shape[1]}x{rgb.shape[0]}"
    return _analyse(rgb, failure=failure, retryable=False)


def _undecodable() -> QualityReport:
    return QualityReport(
        ok=False,
        reason="undecodable image",
        retryable=False,
        flagged=(),
        brightness=0.0,
        contrast=0.0,
        sharpness=0.0,
        phash="0" * 16,
    )


def check_image(data: bytes, *, width: int, height: int, format: str) -> QualityReport:
    """Check encoded image bytes against the size and format the request asked for."""
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is a reason to refuse, not a log line.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                actual_format = _normalise_format(image.format or "")
                actual_size = image.size
                rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ):
        return _undecodable()
    expected_format = _normalise_format(format)
    failure: str | None = None
    if actual_format != expected_format:
        failure = f"format mismatch: expected {expected_format}, got {actual_format}"
    elif actual_size != (width, height):
        failure = f"size mismatch: expected {width}x{height}, got {actual_size[0]}x{actual_size[1]}"
    return _analyse(rgb, failure=failure, retryable=False)


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes of the same length."""
    if len(a) != len(b):
        raise ValueError(
            f"hamming: hashes must be the same length, got {len(a)} and {len(b)} hex chars"
        )
    try:
        return (int(a, 16) ^ int(b, 16)).bit_count()
    except ValueError:
        raise ValueError(f"hamming: hashes must be hex strings, got {a!r} and {b!r}") from None
