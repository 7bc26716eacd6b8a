"""Input images for tests: PNG bytes of a seeded gradient, OpenAI-style alpha masks, and a PNG
whose header claims a huge size (a decompression bomb in a few bytes)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata(
        [(x * 4 % 256, y * 5 % 256, (x + y) % 256) for y in range(height) for x in range(width)]
    )
    return image


def alpha_mask(width: int, height: int, box: tuple[int, int, int, int]) -> bytes:
    """OpenAI's mask convention: opaque everywhere but `box`, fully transparent (edit here)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return png(mask)


def white_mask(width: int, height: int, box: tuple[int, int, int, int]) -> bytes:
    """imagegen's (and A1111's) mask convention: black = keep, white `box` = repaint."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return png(mask)


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming a huge size, with a tiny IDAT: a few bytes on
    the wire that would decode to width*height*3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
