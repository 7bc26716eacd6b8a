"""Input images are decoded, checked and normalised at the edge, and every bad file is a 400
naming its field before any model work (server.inputs); <lora:> tags come out of the prompt."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from server import errors
from server.inputs import decode_inputs
from server.request import ImageRequest, LoraRequest, split_lora_tags
from tests.helpers_images import gradient, header_only_png, png

CAP = 16.0


def decode(**fields: object):  # type: ignore[no-untyped-def]
    request = ImageRequest(prompt="p", **fields)  # type: ignore[arg-type]
    return decode_inputs(request, max_megapixels=CAP)


def refused(field: str, **fields: object) -> str:
    with pytest.raises(errors.InvalidRequestError) as caught:
        decode(**fields)
    assert caught.value.param == field
    return caught.value.message


def test_no_image_means_no_inputs_and_a_lone_mask_is_refused() -> None:
    assert decode() is None
    assert "needs an image" in refused("mask", mask=png(gradient()))


def test_text_file_truncated_png_and_huge_header_are_400s_naming_the_field() -> None:
    assert "not an image" in refused("image", images=(b"hello, this is text\n",))
    whole = png(gradient())
    assert "truncated or corrupt" in refused("image", images=(whole[: len(whole) // 2],))
    message = refused("image", images=(header_only_png(20000, 20000),))
    assert "too large" in message and "server.max_input_megapixels" in message
    message = refused("image", images=(header_only_png(5000, 4000),))
    assert "5000x4000, 20.0 megapixels" in message
    assert "empty" in refused("mask", images=(whole,), mask=b"")


def test_type_is_sniffed_from_content_and_exotic_formats_are_refused() -> None:
    jpeg = io.BytesIO()
    gradient().save(jpeg, format="JPEG")
    inputs = decode(images=(jpeg.getvalue(),))
    assert inputs is not None and inputs.images[0].width == 64
    tiff = io.BytesIO()
    gradient().save(tiff, format="TIFF")
    assert "PNG, JPEG" in refused("image", images=(tiff.getvalue(),))


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    gradient(64, 32).save(buf, format="JPEG", exif=exif)
    inputs = decode(images=(buf.getvalue(),))
    assert inputs is not None
    assert (inputs.images[0].width, inputs.images[0].height) == (32, 64)


@pytest.mark.parametrize("mode", ["P", "CMYK", "RGBA", "LA", "I;16"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    source = gradient().convert(mode) if mode != "I;16" else gradient().convert("L").convert("I;16")
    data = png(source) if mode != "CMYK" else _jpeg(source)
    inputs = decode(images=(data,))
    assert inputs is not None
    assert Image.open(io.BytesIO(inputs.images[0].data)).mode == "RGB"


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def test_size_comes_from_the_image_rounded_down_to_16_without_a_requested_size() -> None:
    inputs = decode(images=(png(gradient(70, 50)),))
    assert inputs is not None
    assert (inputs.width, inputs.height) == (64, 48)
    assert (inputs.images[0].width, inputs.images[0].height) == (64, 48)


@pytest.mark.parametrize("mode", ["crop", "stretch", "pad"])
def test_resize_modes_meet_the_requested_size(mode: str) -> None:
    inputs = decode(images=(png(gradient(64, 32)),), width=32, height=32, resize_mode=mode)
    assert inputs is not None
    image = Image.open(io.BytesIO(inputs.images[0].data))
    assert image.size == (32, 32)
    if mode == "pad":  # bars above and below, in one flat colour
        top = {image.getpixel((x, 0)) for x in range(32)}
        assert len(top) == 1


def test_mask_must_match_the_image_and_mark_something() -> None:
    image = png(gradient(64, 48))
    message = refused("mask", images=(image,), mask=png(Image.new("L", (32, 32), 255)))
    assert "32x32" in message and "64x48" in message
    assert "nothing to repaint" in refused(
        "mask", images=(image,), mask=png(Image.new("L", (64, 48), 0))
    )


def test_white_is_repaint_and_openai_alpha_converts_to_it() -> None:
    image = png(gradient(64, 48))
    alpha_mask = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    alpha_mask.paste((0, 0, 0, 0), (0, 0, 16, 16))  # transparent corner = edit there
    inputs = decode(images=(image,), mask=png(alpha_mask), mask_convention="alpha")
    assert inputs is not None and inputs.mask is not None
    mask = Image.open(io.BytesIO(inputs.mask.data))
    assert mask.mode == "L"
    assert mask.getpixel((2, 2)) == 255 and mask.getpixel((40, 40)) == 0
    assert "no transparent pixels" in refused(
        "mask",
        images=(image,),
        mask=png(Image.new("RGBA", (64, 48), (0, 0, 0, 255))),
        mask_convention="alpha",
    )


def test_openai_convention_takes_the_images_own_transparency_as_mask() -> None:
    rgba = gradient(64, 48).convert("RGBA")
    rgba.paste((0, 0, 0, 0), (32, 0, 64, 48))
    inputs = decode(images=(png(rgba),), mask_convention="alpha")
    assert inputs is not None and inputs.mask is not None
    assert Image.open(io.BytesIO(inputs.mask.data)).getpixel((50, 10)) == 255


def test_masked_mode_keeps_the_image_size_and_leaves_the_working_size_open() -> None:
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (8, 8, 20, 20))
    inputs = decode(images=(png(gradient(64, 48)),), mask=png(mask), inpaint_area="masked")
    assert inputs is not None and inputs.mask is not None
    assert (inputs.width, inputs.height) == (None, None)
    assert inputs.images[0].width == 64 and inputs.mask.width == 64


def test_the_hash_is_of_the_pixels_not_the_file() -> None:
    image = gradient()
    plain = decode(images=(png(image),))
    tagged = decode(images=(png(image, compress_level=9, pnginfo=_info("x")),))
    other = gradient(64, 48).rotate(180)
    different = decode(images=(png(other),))
    assert plain is not None and tagged is not None and different is not None
    assert plain.images[0].sha256 == tagged.images[0].sha256
    assert plain.images[0].sha256 != different.images[0].sha256


def _info(text: str):  # type: ignore[no-untyped-def]
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", text)
    return info


def test_too_many_images_are_refused() -> None:
    one = png(gradient(16, 16))
    assert "at most 16" in refused("image", images=(one,) * 17)


def test_lora_tags_leave_the_prompt_with_their_weights() -> None:
    text, loras = split_lora_tags("a cat <lora:ink:0.6> in a hat <LORA:film> ")
    assert text == "a cat in a hat"
    assert loras == (LoraRequest("ink", 0.6), LoraRequest("film", 1.0))
    with pytest.raises(errors.InvalidRequestError) as caught:
        split_lora_tags("x <lora:ink:strong>")
    assert caught.value.param == "prompt" and "not a number" in caught.value.message


def test_black_convention_is_the_inverse_of_white() -> None:
    """A1111's inpainting_mask_invert: decoded (under the cap) and inverted here, at the edge."""
    image = png(gradient(64, 48))
    white = Image.new("L", (64, 48), 0)
    white.paste(255, (8, 8, 24, 24))
    black = Image.new("L", (64, 48), 255)
    black.paste(0, (8, 8, 24, 24))
    plain = decode(images=(image,), mask=png(white))
    inverted = decode(images=(image,), mask=png(black), mask_convention="black")
    assert plain is not None and inverted is not None and plain.mask and inverted.mask
    assert plain.mask.sha256 == inverted.mask.sha256
    message = refused(
        "mask", images=(image,), mask=header_only_png(5000, 4000), mask_convention="black"
    )
    assert "server.max_input_megapixels" in message
