"""Prompt presets: the built-in data file, expansion, user overrides and error messages."""

from __future__ import annotations

import dataclasses
from importlib import resources

import pytest

from server.presets import Preset, PresetBook, PresetError

BUILTIN = ["illustration", "photoreal", "product-photo", "ui-design"]


@pytest.fixture(scope="module")
def book() -> PresetBook:
    return PresetBook.load()


def test_data_file_names_its_date_and_source() -> None:
    text = (resources.files("server") / "data" / "presets.toml").read_text(encoding="utf-8")
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "2026-11-28" in header
    assert "common prompt-engineering practice for SDXL/Flux, curated by imagegen" in header


def test_builtin_names_are_sorted_and_complete(book: PresetBook) -> None:
    assert set(BUILTIN) <= set(book.names())
    assert book.names() == sorted(book.names())


def test_default_negative_prompt(book: PresetBook) -> None:
    assert book.default_negative_prompt == "blurry, deformed, extra limbs, watermark, text"


@pytest.mark.parametrize(
    ("name", "terms"),
    [
        ("product-photo", ["studio lighting", "white background", "8K", "professional"]),
        ("illustration", ["digital art", "concept art", "detailed", "trending on ArtStation"]),
        ("photoreal", ["photorealistic", "DSLR", "natural lighting", "RAW photo"]),
        ("ui-design", ["flat design", "minimal", "clean", "UI mockup", "Figma style"]),
    ],
)
def test_builtin_preset_content(book: PresetBook, name: str, terms: list[str]) -> None:
    preset = book.get(name)
    assert preset.name == name
    assert "{prompt}" in preset.template
    for term in terms:
        assert term in preset.template
    assert preset.negative_prompt.strip()
    assert preset.description.strip()


@pytest.mark.parametrize(
    ("name", "prompt", "negative", "expected"),
    [
        (None, "a cat", None, ("a cat", None)),
        (None, "a cat", "dogs", ("a cat", "dogs")),
        (
            "illustration",
            "a cat",
            None,
            (
                "a cat, digital art, concept art, detailed, trending on ArtStation",
                "blurry, deformed, extra limbs, watermark, text, photo, photorealistic",
            ),
        ),
        (
            "illustration",
            "a cat",
            "dogs, fur",
            (
                "a cat, digital art, concept art, detailed, trending on ArtStation",
                "dogs, fur, blurry, deformed, extra limbs, watermark, text, photo, photorealistic",
            ),
        ),
        (
            "ui-design",
            "login screen",
            "  ",
            (
                "login screen, flat design, minimal, clean, UI mockup, Figma style",
                "blurry, distorted text, watermark, photo, clutter, 3d render",
            ),
        ),
        # Braces in a prompt are literal text, never format fields.
        (
            "ui-design",
            "a {json} badge",
            None,
            (
                "a {json} badge, flat design, minimal, clean, UI mockup, Figma style",
                "blurry, distorted text, watermark, photo, clutter, 3d render",
            ),
        ),
    ],
)
def test_expand(
    book: PresetBook,
    name: str | None,
    prompt: str,
    negative: str | None,
    expected: tuple[str, str | None],
) -> None:
    assert book.expand(name, prompt, negative) == expected


def test_unknown_preset_names_the_choices(book: PresetBook) -> None:
    message = (
        "preset: unknown preset 'foo'; choose one of: "
        "illustration, photoreal, product-photo, ui-design"
    )
    with pytest.raises(PresetError) as info:
        book.get("foo")
    assert str(info.value) == message
    with pytest.raises(PresetError, match="unknown preset 'foo'"):
        book.expand("foo", "a cat", None)


def test_user_preset_overrides_builtin_and_adds_new() -> None:
    book = PresetBook.load(
        {
            "photoreal": {
                "template": "RAW photo of {prompt}, 35mm",
                "negative_prompt": "cgi",
                "description": "mine",
            },
            "watercolor": {"template": "{prompt}, watercolor", "negative_prompt": "photo"},
        }
    )
    assert book.get("photoreal") == Preset(
        "photoreal", "RAW photo of {prompt}, 35mm", "cgi", "mine"
    )
    assert book.expand("photoreal", "a fox", "blur") == ("RAW photo of a fox, 35mm", "blur, cgi")
    assert book.expand("watercolor", "a fox", None) == ("a fox, watercolor", "photo")
    assert "watercolor" in book.names()
    # Overrides live in that book only.
    assert PresetBook.load().get("photoreal").template.startswith("{prompt}, photorealistic")


def test_partial_user_override_keeps_the_builtin_fields() -> None:
    builtin = PresetBook.load().get("product-photo")
    preset = PresetBook.load({"product-photo": {"negative_prompt": "people"}}).get("product-photo")
    assert preset == dataclasses.replace(builtin, negative_prompt="people")


def test_new_user_preset_without_negative_uses_the_default() -> None:
    book = PresetBook.load({"mine": {"template": "{prompt}, mine"}})
    assert book.get("mine").negative_prompt == book.default_negative_prompt
    assert book.get("mine").description == ""


def test_empty_preset_negative_prompt_gives_none_or_the_users() -> None:
    book = PresetBook.load({"bare": {"template": "{prompt}!", "negative_prompt": ""}})
    assert book.expand("bare", "hi", None) == ("hi!", None)
    assert book.expand("bare", "hi", "x") == ("hi!", "x")


@pytest.mark.parametrize(
    ("user", "fragment"),
    [
        ({"mine": {"template": "a watercolor"}}, "presets.mine.template: must contain {prompt}"),
        ({"photoreal": {"template": "no placeholder"}}, "presets.photoreal.template"),
        ({"mine": {"negative_prompt": "x"}}, "presets.mine.template: missing"),
        (
            {"mine": {"template": "{prompt}", "negativ_prompt": "x"}},
            "unknown field(s) negativ_prompt",
        ),
        ({"mine": {"template": 3}}, "presets.mine.template: must be a string, got int"),
        ({" ": {"template": "{prompt}"}}, "preset name must not be empty"),
    ],
)
def test_bad_user_presets(user: dict[str, dict[str, object]], fragment: str) -> None:
    with pytest.raises(PresetError) as info:
        PresetBook.load(user)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert str(info.value).startswith("config")


def test_preset_error_is_a_value_error() -> None:
    assert issubclass(PresetError, ValueError)


def test_preset_is_frozen(book: PresetBook) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        book.get("photoreal").template = "{prompt}"  # type: ignore[misc]
