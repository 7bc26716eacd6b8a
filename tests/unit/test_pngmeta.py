"""Reproducible PNGs: A1111 parameter text, embedding, reading back, and error cases."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from server.pngmeta import MetadataError, a1111_parameters, embed, read

BASE: dict[str, Any] = {
    "steps": 20,
    "sampler": "euler_a",
    "cfg_scale": 7.0,
    "seed": 1,
    "width": 512,
    "height": 512,
    "model": "sdxl",
    "model_hash": "abc",
}


@pytest.mark.parametrize(
    ("prompt", "negative", "overrides", "expected"),
    [
        (
            "a cat",
            "blurry",
            {},
            "a cat\nNegative prompt: blurry\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
            "Model hash: abc, Model: sdxl",
        ),
        (
            "a cat",
            None,
            {},
            "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
            "Model hash: abc, Model: sdxl",
        ),
        (
            "a cat",
            "",
            {"cfg_scale": 7.5, "seed": 4294967295, "width": 1024, "height": 768},
            "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 4294967295, "
            "Size: 1024x768, Model hash: abc, Model: sdxl",
        ),
        (
            "a cat",
            None,
            {
                "steps": None,
                "sampler": None,
                "cfg_scale": None,
                "model_hash": None,
                "model": "dall-e-3",
            },
            "a cat\nSeed: 1, Size: 512x512, Model: dall-e-3",
        ),
        # A value holding a separator is JSON-quoted, as A1111 does.
        (
            "a cat",
            None,
            {"model": "my:model, v2", "model_hash": None, "sampler": "LMS"},
            "a cat\nSteps: 20, Sampler: LMS, CFG scale: 7, Seed: 1, Size: 512x512, "
            'Model: "my:model, v2"',
        ),
    ],
)
def test_a1111_parameters_exact(
    prompt: str, negative: str | None, overrides: dict[str, Any], expected: str
) -> None:
    assert a1111_parameters(prompt, negative, **{**BASE, **overrides}) == expected


@pytest.mark.parametrize(
    ("scheduler", "sampler"),
    [
        ("euler", "Euler"),
        ("euler_a", "Euler a"),
        ("dpmpp_2m", "DPM++ 2M"),
        ("dpmpp_2m_karras", "DPM++ 2M Karras"),
        ("ddim", "DDIM"),
        ("flow_euler", "Euler (flow)"),
        ("unipc", "UniPC"),
        ("some_future_one", "some_future_one"),
    ],
)
def test_sampler_names(scheduler: str, sampler: str) -> None:
    text = a1111_parameters("p", None, **{**BASE, "sampler": scheduler})
    assert f", Sampler: {sampler}, " in text


def _image(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
    image = Image.fromarray(rgba).convert(mode)
    if mode == "P":
        image.info["transparency"] = 3
    return image


def _png(image: Image.Image, pnginfo: PngImagePlugin.PngInfo | None = None) -> bytes:
    out = io.BytesIO()
    extra = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    image.save(out, format="PNG", pnginfo=pnginfo, **extra)
    return out.getvalue()


def _decoded(png: bytes) -> tuple[str, dict[str, Any], np.ndarray[Any, Any]]:
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return image.mode, {k: image.info.get(k) for k in ("transparency",)}, np.asarray(image)


RECORD = {
    "prompt": "a cat",
    "seed": 1,
    "steps": 20,
    "guidance_scale": 7.0,
    "model": "sdxl",
    "loras": [{"name": "x", "scale": 0.8}],
    "sampler": None,
}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_round_trip_keeps_pixels(mode: str) -> None:
    original = _png(_image(mode))
    parameters = a1111_parameters("a cat", "blurry", **BASE)
    tagged = embed(original, parameters=parameters, record=RECORD)
    assert tagged != original
    assert read(tagged) == (parameters, RECORD)
    before_mode, before_info, before = _decoded(original)
    after_mode, after_info, after = _decoded(tagged)
    assert (after_mode, after_info) == (before_mode, before_info)
    np.testing.assert_array_equal(after, before)


def test_chunks_are_latin1_text_or_utf8_itxt() -> None:
    ascii_png = embed(_png(_image("RGB")), parameters="a cat", record={"k": 1})
    assert b"tEXtparameters\x00a cat" in ascii_png
    assert b'tEXtimagegen\x00{"k":1}' in ascii_png
    unicode_png = embed(_png(_image("RGB")), parameters="猫 🚀", record={"prompt": "猫 🚀"})
    assert b"iTXtparameters" in unicode_png
    assert read(unicode_png) == ("猫 🚀", {"prompt": "猫 🚀"})


def test_embed_is_deterministic_and_idempotent() -> None:
    original = _png(_image("RGB"))
    first = embed(original, parameters="p", record=RECORD)
    assert embed(original, parameters="p", record=RECORD) == first
    # Re-embedding replaces our chunks rather than stacking them.
    assert embed(first, parameters="p", record=RECORD) == first
    # Key order in the record does not change the bytes.
    assert embed(original, parameters="p", record=dict(reversed(RECORD.items()))) == first


def test_embed_replaces_ours_and_keeps_other_text() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "some backend")
    info.add_text("parameters", "stale")
    tagged = embed(_png(_image("RGB"), info), parameters="fresh", record={"v": 2})
    assert read(tagged) == ("fresh", {"v": 2})
    with Image.open(io.BytesIO(tagged)) as image:
        assert isinstance(image, PngImagePlugin.PngImageFile)
        assert image.text == {
            "Software": "some backend",
            "parameters": "fresh",
            "imagegen": '{"v":2}',
        }


def test_embed_keeps_gamma_and_dpi() -> None:
    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", (45455).to_bytes(4, "big"))
    image = _image("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info, dpi=(300, 300))
    tagged = embed(out.getvalue(), parameters="p", record={})
    with Image.open(io.BytesIO(tagged)) as reopened:
        assert reopened.info["gamma"] == pytest.approx(0.45455)
        assert reopened.info["dpi"] == pytest.approx((300, 300), abs=0.1)


def test_read_without_metadata() -> None:
    assert read(_png(_image("RGB"))) == (None, None)


def test_read_only_parameters() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "from A1111")
    assert read(_png(_image("RGB"), info)) == ("from A1111", None)


def _jpeg() -> bytes:
    out = io.BytesIO()
    _image("RGB").save(out, format="JPEG")
    return out.getvalue()


NOT_PNG: list[tuple[str, Callable[[], bytes], str]] = [
    ("jpeg", _jpeg, "not a PNG"),
    ("garbage", lambda: b"hello", "not a PNG"),
    ("empty", lambda: b"", "not a PNG"),
    ("truncated", lambda: _png(_image("RGB"))[:60], "could not be decoded"),
]


@pytest.mark.parametrize(
    ("data", "fragment"), [c[1:] for c in NOT_PNG], ids=[c[0] for c in NOT_PNG]
)
@pytest.mark.parametrize("operation", ["read", "embed"])
def test_non_png_is_a_metadata_error(
    operation: str, data: Callable[[], bytes], fragment: str
) -> None:
    with pytest.raises(MetadataError) as info:
        if operation == "read":
            read(data())
        else:
            embed(data(), parameters="p", record={})
    assert str(info.value).startswith(f"{operation}: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("record", "fragment"),
    [({"s": {1, 2}}, "JSON-serialisable"), ({"x": float("nan")}, "JSON-serialisable")],
)
def test_unserialisable_record(record: dict[str, object], fragment: str) -> None:
    with pytest.raises(MetadataError, match=fragment):
        embed(_png(_image("RGB")), parameters="p", record=record)


@pytest.mark.parametrize(
    ("chunk", "fragment"),
    [("{not json", "not valid JSON"), ("[1, 2]", "must hold a JSON object, got list")],
)
def test_malformed_record_chunk(chunk: str, fragment: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("imagegen", chunk)
    with pytest.raises(MetadataError, match=fragment):
        read(_png(_image("RGB"), info))


def test_metadata_error_is_a_value_error() -> None:
    assert issubclass(MetadataError, ValueError)
