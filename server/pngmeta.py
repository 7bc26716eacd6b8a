"""Reproducible PNGs: the generation parameters written into, and read back from, PNG text."""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Mapping, Sequence

from PIL import Image

from server.samplers import A1111_SAMPLERS

PARAMETERS_KEY = "parameters"  # the key AUTOMATIC1111, ComfyUI importers and Civitai read
RECORD_KEY = "imagegen"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Fixed so the same pixels and text always give the same bytes (Pillow writes no tIME chunk).
_COMPRESS_LEVEL = 6


class MetadataError(ValueError):
    """The bytes are not a PNG, or its imagegen metadata is malformed."""


def _quote(value: str) -> str:
    # A1111's own rule: a value holding a separator is written as a JSON string so that the
    # "key: value, key: value" line still parses.
    if "," in value or ":" in value or "\n" in value:
        return json.dumps(value)
    return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def a1111_parameters(
    prompt: str,
    negative_prompt: str | None,
    *,
    steps: int | None,
    sampler: str | None,
    cfg_scale: float | None,
    seed: int,
    width: int,
    height: int,
    model: str,
    model_hash: str | None,
    denoising_strength: float | None = None,
    mask_blur: int | None = None,
    loras: Sequence[tuple[str, float, str]] = (),
) -> str:
    """AUTOMATIC1111's "parameters" text; fields we do not know (None) are left out. LoRAs
    (name, weight, sha256) are written as A1111 does: <lora:name:weight> tags on the prompt
    line, and their short hashes in "Lora hashes"."""
    fields: list[tuple[str, str]] = []
    if steps is not None:
        fields.append(("Steps", str(steps)))
    if sampler is not None:
        fields.append(("Sampler", _quote(A1111_SAMPLERS.get(sampler, sampler))))
    if cfg_scale is not None:
        fields.append(("CFG scale", _number(cfg_scale)))
    fields.append(("Seed", str(seed)))
    fields.append(("Size", f"{width}x{height}"))
    if model_hash:
        fields.append(("Model hash", _quote(model_hash)))
    fields.append(("Model", _quote(model)))
    if denoising_strength is not None:
        fields.append(("Denoising strength", _number(denoising_strength)))
    if mask_blur is not None:
        fields.append(("Mask blur", str(mask_blur)))
    if loras:
        hashes = ", ".join(f"{name}: {sha256[:12]}" for name, _, sha256 in loras)
        fields.append(("Lora hashes", json.dumps(hashes)))
        tags = " ".join(f"<lora:{name}:{_number(weight)}>" for name, weight, _ in loras)
        prompt = f"{prompt} {tags}"
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def _open_png(png: bytes, *, what: str) -> Image.Image:
    if not png.startswith(_PNG_SIGNATURE):
        raise MetadataError(
            f"{what}: not a PNG (missing the PNG signature); pass PNG bytes, "
            "or ask the backend for output_format png"
        )
    try:
        image = Image.open(io.BytesIO(png))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MetadataError(f"{what}: PNG could not be decoded ({type(exc).__name__})") from None
    return image


def _text_chunks(image: Image.Image) -> Mapping[str, str]:
    text = getattr(image, "text", None)
    return text if isinstance(text, Mapping) else {}


def embed(png: bytes, *, parameters: str, record: Mapping[str, object]) -> bytes:
    """New PNG bytes with the "parameters" and "imagegen" text chunks set; pixels unchanged.

    The chunks are spliced into the file rather than re-encoding the image: every other chunk
    (pixels, ICC profile, gamma, other text) stays byte for byte, and it costs microseconds
    on the serving hot path instead of a decode and an encode."""
    try:
        record_text = json.dumps(
            dict(record),
            separators=(",", ":"),
            sort_keys=True,
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"record: must be JSON-serialisable ({exc})") from None
    chunks = _split_chunks(png, what="embed")
    ours = (PARAMETERS_KEY.encode(), RECORD_KEY.encode())
    kept = [c for c in chunks if not (c[0] in _TEXT_TYPES and c[1].split(b"\0", 1)[0] in ours)]
    first_idat = next(i for i, (kind, _) in enumerate(kept) if kind == b"IDAT")
    text = [_text_chunk(PARAMETERS_KEY, parameters), _text_chunk(RECORD_KEY, record_text)]
    out = [_PNG_SIGNATURE]
    for kind, data in [*kept[:first_idat], *text, *kept[first_idat:]]:
        out.append(len(data).to_bytes(4, "big") + kind + data)
        out.append(zlib.crc32(kind + data).to_bytes(4, "big"))
    return b"".join(out)


_TEXT_TYPES = (b"tEXt", b"iTXt", b"zTXt")


def _text_chunk(key: str, value: str) -> tuple[bytes, bytes]:
    """Latin-1 text as tEXt (what A1111 writes), anything else as uncompressed UTF-8 iTXt."""
    try:
        return b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")
    except UnicodeEncodeError:
        return b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")


def _split_chunks(png: bytes, *, what: str) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checked for structure and CRCs; MetadataError otherwise."""
    if not png.startswith(_PNG_SIGNATURE):
        _open_png(png, what=what)  # raises the not-a-PNG error
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(_PNG_SIGNATURE)
    while pos < len(png):
        if pos + 12 > len(png):
            raise MetadataError(f"{what}: PNG could not be decoded (truncated)")
        length = int.from_bytes(png[pos : pos + 4], "big")
        kind = png[pos + 4 : pos + 8]
        data = png[pos + 8 : pos + 8 + length]
        crc = png[pos + 8 + length : pos + 12 + length]
        if len(data) != length or len(crc) != 4:
            raise MetadataError(f"{what}: PNG could not be decoded (truncated)")
        if zlib.crc32(kind + data).to_bytes(4, "big") != crc:
            raise MetadataError(f"{what}: PNG could not be decoded (bad CRC in {kind!r})")
        chunks.append((kind, data))
        pos += 12 + length
        if kind == b"IEND":
            break
    kinds = [kind for kind, _ in chunks]
    if not kinds or kinds[0] != b"IHDR" or b"IDAT" not in kinds or kinds[-1] != b"IEND":
        raise MetadataError(f"{what}: PNG could not be decoded (IHDR, IDAT and IEND are required)")
    return chunks


def read(png: bytes) -> tuple[str | None, dict[str, object] | None]:
    """(parameters text, imagegen record) from a PNG; either is None when its chunk is absent."""
    with _open_png(png, what="read") as image:
        chunks = _text_chunks(image)
        parameters = chunks.get(PARAMETERS_KEY)
        record_text = chunks.get(RECORD_KEY)
    record: dict[str, object] | None = None
    if record_text is not None:
        try:
            loaded = json.loads(str(record_text))
        except json.JSONDecodeError as exc:
            raise MetadataError(f"read: the {RECORD_KEY} chunk is not valid JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise MetadataError(
                f"read: the {RECORD_KEY} chunk must hold a JSON object, got {type(loaded).__name__}"
            )
        record = loaded
    return (str(parameters) if parameters is not None else None), record
