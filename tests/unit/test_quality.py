"""Image quality control: failure detection, statistics and perceptual hashes."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from server.quality import (
    QualityReport,
    check_image,
    check_pixels,
    hamming,
)

Pixels = npt.NDArray[np.uint8]


def _noise(seed: int, size: int = 64) -> Pixels:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _flat(level: int, size: int = 64) -> Pixels:
    return np.full((size, size, 3), level, dtype=np.uint8)


def _stars() -> Pixels:
    # A few bright pixels on black: max is 255 but mean luminance is under 1.
    pixels = _flat(0)
    pixels[::32, ::32] = 255
    return pixels


def _smooth(seed: int) -> Pixels:
    # Coarse random blocks blown up: structure at the scale pHash looks at.
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC))


def _check(pixels: Pixels) -> QualityReport:
    """The check a local pipeline's own pixels get (no decode)."""
    return check_pixels(pixels, width=pixels.shape[1], height=pixels.shape[0])


def _encode(pixels: Pixels, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def _png(pixels: Pixels) -> bytes:
    return _encode(pixels, "PNG")


# (case, bytes, expected format, ok, reason, retryable, flagged)
IMAGE_CASES: list[tuple[str, Callable[[], bytes], str, bool, str | None, bool, tuple[str, ...]]] = [
    ("noise", lambda: _png(_noise(0)), "png", True, None, False, ()),
    ("black", lambda: _png(_flat(0)), "png", False, "all-black frame", True, ("near-uniform",)),
    (
        "level-2 black",
        lambda: _png(_flat(2)),
        "png",
        False,
        "all-black frame",
        True,
        ("near-uniform",),
    ),
    ("stars", lambda: _png(_stars()), "png", False, "all-black frame", True, ()),
    (
        "black jpeg",
        lambda: _encode(_flat(0), "JPEG"),
        "jpeg",
        False,
        "all-black frame",
        True,
        ("near-uniform",),
    ),
    ("dark but real", lambda: _png(_flat(3)), "png", True, None, False, ("near-uniform",)),
    ("flat gray", lambda: _png(_flat(128)), "png", True, None, False, ("near-uniform",)),
    (
        "jpeg as png",
        lambda: _encode(_noise(0), "JPEG"),
        "png",
        False,
        "format mismatch: expected png, got jpeg",
        False,
        (),
    ),
    ("jpg alias", lambda: _encode(_noise(0), "JPEG"), "jpg", True, None, False, ()),
    ("webp", lambda: _encode(_noise(0), "WEBP"), "WEBP", True, None, False, ()),
    (
        "wrong size",
        lambda: _png(_noise(0, size=32)),
        "png",
        False,
        "size mismatch: expected 64x64, got 32x32",
        False,
        (),
    ),
    ("garbage", lambda: b"not an image at all", "png", False, "undecodable image", False, ()),
    ("empty", lambda: b"", "png", False, "undecodable image", False, ()),
    ("truncated", lambda: _png(_noise(0))[:200], "png", False, "undecodable image", False, ()),
]


@pytest.mark.parametrize(
    ("data", "fmt", "ok", "reason", "retryable", "flagged"),
    [case[1:] for case in IMAGE_CASES],
    ids=[case[0] for case in IMAGE_CASES],
)
def test_check_image(
    data: Callable[[], bytes],
    fmt: str,
    ok: bool,
    reason: str | None,
    retryable: bool,
    flagged: tuple[str, ...],
) -> None:
    report = check_image(data(), width=64, height=64, format=fmt)
    assert (report.ok, report.reason, report.retryable, report.flagged) == (
        ok,
        reason,
        retryable,
        flagged,
    )


@pytest.mark.parametrize(
    "pixels", [_noise(4), _flat(0), _stars(), _smooth(5)], ids=["noise", "black", "stars", "smooth"]
)
def test_check_pixels_reports_what_decoding_the_png_reports(pixels: Pixels) -> None:
    """Local backends hand over the pixels they encoded; checking those must give the report
    that decoding their PNG gives."""
    assert check_pixels(pixels, width=64, height=64) == check_image(
        _png(pixels), width=64, height=64, format="png"
    )


def test_check_pixels_size_mismatch_and_bad_input() -> None:
    report = check_pixels(_noise(6), width=64, height=32)
    assert (report.ok, report.reason) == (False, "size mismatch: expected 64x32, got 64x64")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        check_pixels(_noise(6) / 255.0, width=64, height=64)  # type: ignore[arg-type]


def _with(value: float) -> npt.NDArray[np.float64]:
    pixels = np.full((16, 16, 3), 0.5)
    pixels[4, 7, 1] = value
    return pixels


def test_noise_is_sharp_and_blur_is_not() -> None:
    noise = _check(_noise(3))
    assert noise.sharpness > 10_000
    assert noise.contrast > 30
    blurred = _check(_smooth(3))
    assert 0 < blurred.sharpness < noise.sharpness / 50


@pytest.mark.parametrize(("level", "brightness"), [(0, 0.0), (128, 128.0), (255, 255.0)])
def test_brightness_of_flat_frames(level: int, brightness: float) -> None:
    report = check_image(_png(_flat(level)), width=64, height=64, format="png")
    assert report.brightness == pytest.approx(brightness)
    assert report.contrast == pytest.approx(0.0)
    assert report.sharpness == pytest.approx(0.0)


def test_luminance_uses_bt601_weights() -> None:
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert _check(red).brightness == pytest.approx(0.299 * 255)


def test_phash_is_16_hex_chars_and_agrees_between_bytes_and_arrays() -> None:
    pixels = _smooth(4)
    from_bytes = check_image(_png(pixels), width=64, height=64, format="png").phash
    from_array = _check(pixels).phash
    assert from_bytes == from_array
    assert len(from_bytes) == 16
    int(from_bytes, 16)
    assert _check(_flat(76, size=8)).phash == "0" * 16


def test_phash_survives_jpeg_and_resizing() -> None:
    pixels = _smooth(5)
    reference = _check(pixels).phash
    jpeg = check_image(_encode(pixels, "JPEG"), width=64, height=64, format="jpeg").phash
    bigger = np.asarray(Image.fromarray(pixels).resize((128, 128), Image.Resampling.BILINEAR))
    assert hamming(reference, jpeg) <= 4
    assert hamming(reference, _check(bigger).phash) <= 4


@pytest.mark.parametrize("seed", range(5))
def test_phash_tells_perturbed_from_unrelated(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    base = _noise(seed)
    noise = rng.normal(0.0, 0.02 * 255, base.shape)
    perturbed = np.clip(np.round(base + noise), 0, 255).astype(np.uint8)
    unrelated = _noise(seed + 50)
    reference, other, near = (_check(p).phash for p in (base, unrelated, perturbed))
    assert hamming(reference, near) <= 4 < hamming(reference, other)


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("0" * 16, "0" * 16, 0),
        ("f" * 16, "0" * 16, 64),
        ("8000000000000000", "0" * 16, 1),
        ("DEADBEEF00000000", "deadbeef00000001", 1),
    ],
)
def test_hamming(a: str, b: str, distance: int) -> None:
    assert hamming(a, b) == distance
    assert hamming(b, a) == distance


@pytest.mark.parametrize(
    ("a", "b", "fragment"),
    [("0" * 16, "0" * 15, "same length"), ("z" * 16, "0" * 16, "hex strings")],
)
def test_hamming_rejects_bad_hashes(a: str, b: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        hamming(a, b)


def test_as_dict_is_json_ready() -> None:
    report = check_image(_png(_flat(0)), width=64, height=64, format="png")
    data = report.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["flagged"] == ["near-uniform"]
    assert set(data) == {f.name for f in QualityReport.__dataclass_fields__.values()}
