"""`imagegen generate --image/--mask/--lora` as a user runs it, in this process (the same
`main()`, tests/helpers_cli.py), real files; bad inputs are one line naming the flag (exit 2),
and --from-image reproduces an edit only with its input image given again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.e2e.test_cli import generate_json
from tests.helpers_cli import imagegen
from tests.helpers_images import gradient, header_only_png, png, white_mask

SIZE = 64


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    made = {
        "image": png(gradient(SIZE, SIZE)),
        "other": png(gradient(SIZE, SIZE).transpose(Image.Transpose.FLIP_TOP_BOTTOM)),
        "mask": white_mask(SIZE, SIZE, (16, 16, 48, 48)),
        "small_mask": white_mask(32, 32, (0, 0, 8, 8)),
        "text": b"hello, this is text\n",
        "huge": header_only_png(20000, 20000),
    }
    paths = {}
    for name, data in made.items():
        paths[name] = tmp_path / f"{name}.png"
        paths[name].write_bytes(data)
    return paths


def refused(env: dict[str, str], tmp_path: Path, *args: str) -> str:
    proc = imagegen(env, "generate", *args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("imagegen: error:")
    assert not list((tmp_path / "out").glob("*.png"))
    return lines[-1]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--image", "{missing}"], "--image: cannot read"),
        (["--image", "{text}"], "--image: image is not an image"),
        (["--image", "{huge}"], "server.max_input_megapixels"),
        (["--image", "{image}", "--mask", "{small_mask}"], "--mask: mask is 32x32"),
        (["--mask", "{mask}"], "--mask: mask needs an image"),
        (["--image", "{image}", "--strength", "2"], "--strength: strength must be"),
        (["--strength", "0.5"], "--strength: strength applies to image inputs only"),
        (["--image", "{image}", "--inpaint-area", "most"], "--inpaint-area must be one of"),
        (["--image", "{image}", "--resize-mode", "squash"], "--resize-mode must be one of"),
        (["--image", "{image}", "--mask-blur", "999"], "--mask-blur: mask_blur must be"),
        (["--lora", "watercolor:heavy"], "--lora must be NAME or NAME:WEIGHT"),
    ],
)
def test_bad_edit_flags_are_one_line_naming_the_flag(
    cli_env: dict[str, str],
    tmp_path: Path,
    files: dict[str, Path],
    args: list[str],
    needle: str,
) -> None:
    names = {name: str(path) for name, path in files.items()}
    names["missing"] = str(tmp_path / "nope.png")
    line = refused(cli_env, tmp_path, "a boat", *[a.format(**names) for a in args])
    assert needle in line


def test_from_image_of_a_text_to_image_png_refuses_an_image(
    cli_env: dict[str, str], tmp_path: Path, files: dict[str, Path]
) -> None:
    made = generate_json(cli_env, tmp_path / "t2i", "a boat", "--seed", "3", "--steps", "2")
    path = made["images"][0]["path"]
    line = refused(cli_env, tmp_path, "--from-image", path, "--image", str(files["image"]))
    assert "--image" in line and "not made from an input image" in line


# -- these need the local img2img/inpaint pipelines -------------------------------------------


def edit_json(env: dict[str, str], out: Path, *args: str) -> dict[str, Any]:
    return generate_json(env, out, "a red door", "--seed", "4", "--steps", "2", *args)


def test_inpaint_then_reproduce_from_the_png(
    cli_env: dict[str, str], tmp_path: Path, files: dict[str, Path]
) -> None:
    image, mask = str(files["image"]), str(files["mask"])
    made = edit_json(cli_env, tmp_path / "a", "--image", image, "--mask", mask, "--mask-blur", "2")
    item = made["images"][0]
    with Image.open(item["path"]) as out:
        assert out.size == (SIZE, SIZE)
        record = json.loads(out.text["imagegen"])
    inputs = record["request"]["inputs"]
    assert inputs["task"] == "inpaint" and inputs["mask_blur"] == 2

    # Without the input image: an error saying which image it needs.
    line = refused(cli_env, tmp_path, "--from-image", item["path"])
    assert f"sha256 {inputs['images'][0][:16]}" in line and "--image" in line
    # With another image: refused, naming --image; with the right image but no mask: --mask.
    line = refused(
        cli_env,
        tmp_path,
        "--from-image",
        item["path"],
        "--image",
        str(files["other"]),
        "--mask",
        mask,
    )
    assert line.startswith("imagegen: error: --image: the image(s) do not match")
    line = refused(cli_env, tmp_path, "--from-image", item["path"], "--image", image)
    assert "--mask" in line
    # The same files again: the same request, so the same bytes (the cache's answer).
    again = generate_json(
        cli_env, tmp_path / "b", "--from-image", item["path"], "--image", image, "--mask", mask
    )
    assert again["cached"] is True
    assert again["images"][0]["sha256"] == item["sha256"]


def test_img2img_with_strength_and_resize_mode(
    cli_env: dict[str, str], tmp_path: Path, files: dict[str, Path]
) -> None:
    image = str(files["image"])
    made = edit_json(
        cli_env,
        tmp_path,
        "--image",
        image,
        "--strength",
        "0.5",
        "--size",
        "64x32",
        "--resize-mode",
        "pad",
    )
    assert (made["images"][0]["width"], made["images"][0]["height"]) == (64, 32)
    again = generate_json(
        cli_env, tmp_path / "b", "--from-image", made["images"][0]["path"], "--image", image
    )
    assert again["cached"] is True


def test_kontext_from_the_cli(
    cli_env: dict[str, str], tmp_path: Path, files: dict[str, Path]
) -> None:
    made = generate_json(
        cli_env,
        tmp_path,
        "make it night",
        "--model",
        "tiny-flux-kontext",
        "--image",
        str(files["image"]),
        "--seed",
        "1",
        "--steps",
        "2",
    )
    assert made["model"] == "tiny-flux-kontext"
    assert (made["images"][0]["width"], made["images"][0]["height"]) == (SIZE, SIZE)
