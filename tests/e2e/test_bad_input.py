"""Hostile input over real HTTP is a 4xx in the route's error shape, answered within a deadline,
and never reaches the device: out-of-range and non-finite numbers, wrong types, bad sizes,
empty and huge prompts, malformed or non-JSON bodies, deep nesting, a body over the cap, lone
surrogates on the A1111 routes, and uploads past the file, field and pixel caps."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.helpers_server import (
    LiveServer,
    fresh_data_dir,
    live_server,
    metric_value,
    tiny_settings,
)

GEN = "/v1/images/generations"
TXT2IMG = "/sdapi/v1/txt2img"
EDITS = "/v1/images/edits"
JSON = {"content-type": "application/json"}
# Every refusal here is a check at the edge: it must come back fast, not after a generation.
DEADLINE_S = 5.0
MAX_BODY_MB = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("bad-input"), tiny_models_dir)
    with live_server(tiny_settings(data, max_body_mb=MAX_BODY_MB)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(timeout=DEADLINE_S) as client:
        yield client


@pytest.fixture
def untouched_device(client: httpx.Client) -> Iterator[None]:
    """The test must not reach the device: pipeline calls are the same after as before."""
    before = metric_value(client.get("/metrics").text, "imagegen_pipeline_calls_total")
    yield
    after = metric_value(client.get("/metrics").text, "imagegen_pipeline_calls_total")
    assert after == before, "a refused request reached the device"


def png(width: int = 64, height: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width`x`height`: what a decompression bomb looks like
    before it is decoded (the pixel data is one row, far too short)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (1 + 3 * 64))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def timed_post(client: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
    started = time.monotonic()
    response = client.post(path, **kwargs)
    assert time.monotonic() - started < DEADLINE_S, f"{path} took past {DEADLINE_S} s to refuse"
    return response


def openai_refusal(response: httpx.Response, status: int, code: str, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in error["message"]
    return str(error["message"])


def a1111_refusal(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert body["error"] == kind, body
    return str(body["detail"])


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


OK = {"prompt": "a quiet harbour", "steps": 1, "size": "64x64"}

# (id, JSON body text, status, error.code, error.param) for POST /v1/images/generations.
GENERATION_ROWS = [
    ("width-huge", {**OK, "size": "100000x64"}, 400, "invalid_request", "size"),
    ("size-negative", {**OK, "size": "-64x64"}, 400, "invalid_request", "size"),
    ("size-zero", {**OK, "size": "0x0"}, 400, "invalid_request", "size"),
    ("size-words", {**OK, "size": "big"}, 400, "invalid_request", "size"),
    ("size-three-sides", {**OK, "size": "64x64x64"}, 400, "invalid_request", "size"),
    ("size-number", {**OK, "size": 64}, 400, "invalid_request", "size"),
    ("size-unicode-digits", {**OK, "size": "٦٤x٦٤"}, 400, "invalid_request", "size"),
    ("size-superscript", {**OK, "size": "²x64"}, 400, "invalid_request", "size"),
    ("steps-huge", {**OK, "steps": 10**12}, 400, "invalid_request", "steps"),
    ("steps-negative", {**OK, "steps": -1}, 400, "invalid_request", "steps"),
    ("steps-float", {**OK, "steps": 1.5}, 400, "invalid_request", "steps"),
    ("steps-text", {**OK, "steps": "1"}, 400, "invalid_request", "steps"),
    ("n-huge", {**OK, "n": 10**30}, 400, "invalid_request", "n"),
    ("n-zero", {**OK, "n": 0}, 400, "invalid_request", "n"),
    ("n-bool", {**OK, "n": True}, 400, "invalid_request", "n"),
    ("seed-negative", {**OK, "seed": -5}, 400, "invalid_request", "seed"),
    ("seed-huge", {**OK, "seed": 10**30}, 400, "invalid_request", "seed"),
    ("guidance-negative", {**OK, "guidance_scale": -1.0}, 400, "invalid_request", "guidance_scale"),
    ("prompt-number", {**OK, "prompt": 5}, 400, "invalid_request", "prompt"),
    ("prompt-list", {**OK, "prompt": ["a", "b"]}, 400, "invalid_request", "prompt"),
    ("prompt-object", {**OK, "prompt": {"text": "a"}}, 400, "invalid_request", "prompt"),
    ("prompt-null", {**OK, "prompt": None}, 400, "invalid_request", "prompt"),
    ("prompt-missing", {"steps": 1}, 400, "invalid_request", "prompt"),
    ("prompt-empty", {**OK, "prompt": ""}, 400, "invalid_request", "prompt"),
    ("loras-object", {**OK, "loras": {"name": "x"}}, 400, "invalid_request", "loras"),
    ("unknown-field", {**OK, "nonsense": 1}, 400, "invalid_request", "nonsense"),
    ("body-array", [OK], 400, "invalid_request", None),
    ("body-string", "a quiet harbour", 400, "invalid_request", None),
    ("body-null", None, 400, "invalid_request", None),
]

# Bodies JSON cannot write from Python values: (id, raw bytes, status, code, param).
RAW_ROWS = [
    ("nan", b'{"prompt": "x", "guidance_scale": NaN}', 400, "invalid_request", "guidance_scale"),
    (
        "inf",
        b'{"prompt": "x", "guidance_scale": Infinity}',
        400,
        "invalid_request",
        "guidance_scale",
    ),
    ("steps-inf", b'{"prompt": "x", "steps": 1e999}', 400, "invalid_request", "steps"),
    ("truncated", b'{"prompt": "x"', 400, "invalid_request", None),
    ("not-json", b"prompt=x", 400, "invalid_request", None),
    ("empty-body", b"", 400, "invalid_request", None),
    ("trailing-garbage", b'{"prompt": "x"} {}', 400, "invalid_request", None),
    (
        "duplicate-keys-bad",
        b'{"prompt": "x", "steps": 1, "steps": -1}',
        400,
        "invalid_request",
        "steps",
    ),
    ("not-utf8", b'{"prompt": "\xff\xfe"}', 400, "invalid_request", None),
    (
        "deep-inside-field",
        b'{"prompt": "x", "user": ' + nested(500).encode() + b"}",
        400,
        "invalid_request",
        "user",
    ),
    ("deep-10000", nested(10_000).encode(), 400, "invalid_request", None),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [pytest.param(*row[1:], id=row[0]) for row in GENERATION_ROWS],
)
@pytest.mark.usefixtures("untouched_device")
def test_a_bad_generation_body_is_a_4xx_naming_the_field(
    client: httpx.Client, body: Any, status: int, code: str, param: str | None
) -> None:
    response = timed_post(client, GEN, content=json.dumps(body).encode(), headers=JSON)
    openai_refusal(response, status, code, param)


@pytest.mark.parametrize(
    ("body", "status", "code", "param"), [pytest.param(*row[1:], id=row[0]) for row in RAW_ROWS]
)
@pytest.mark.usefixtures("untouched_device")
def test_a_malformed_generation_body_is_a_4xx(
    client: httpx.Client, body: bytes, status: int, code: str, param: str | None
) -> None:
    openai_refusal(timed_post(client, GEN, content=body, headers=JSON), status, code, param)


@pytest.mark.usefixtures("untouched_device")
def test_ten_thousand_nested_arrays_are_refused_saying_so(client: httpx.Client) -> None:
    # Past json.loads' recursion limit FastAPI only says it could not parse the body.
    body = b'{"prompt": "x", "user": ' + nested(10_000).encode() + b"}"
    message = openai_refusal(
        timed_post(client, GEN, content=body, headers=JSON), 400, "invalid_request", None
    )
    assert "too deep" in message


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data"])
@pytest.mark.usefixtures("untouched_device")
def test_a_generation_body_of_the_wrong_type_is_a_400(
    client: httpx.Client, content_type: str
) -> None:
    body = json.dumps(OK).encode()
    response = timed_post(client, GEN, content=body, headers={"content-type": content_type})
    openai_refusal(response, 400, "invalid_request", None)


@pytest.mark.usefixtures("untouched_device")
def test_a_100_kb_prompt_is_refused_naming_prompt(client: httpx.Client) -> None:
    body = {**OK, "prompt": "harbour " * 12_800}
    response = timed_post(client, GEN, content=json.dumps(body).encode(), headers=JSON)
    openai_refusal(response, 400, "invalid_request", "prompt")


@pytest.mark.parametrize("path", [GEN, TXT2IMG, EDITS])
@pytest.mark.usefixtures("untouched_device")
def test_a_body_over_the_cap_is_413_in_the_routes_shape(client: httpx.Client, path: str) -> None:
    body = b'{"prompt": "' + b"x" * (MAX_BODY_MB * 1024**2 + 1) + b'"}'
    response = timed_post(client, path, content=body, headers=JSON)
    if path == TXT2IMG:
        assert "server.max_body_mb" in a1111_refusal(response, 413, "request_too_large")
    else:
        openai_refusal(response, 413, "request_too_large", None)


# -- A1111 ---------------------------------------------------------------------------------

A1 = {"prompt": "x", "steps": 1, "width": 64, "height": 64}
A1111_ROWS = [
    ("surrogate-escape", b'{"prompt": "\\ud800"}', "prompt"),
    ("surrogate-bytes", b'{"prompt": "\xed\xa0\x80"}', "prompt"),
    ("surrogate-negative", b'{"prompt": "x", "negative_prompt": "\\udfff"}', "negative_prompt"),
    # A key A1111 ignores is still echoed back in "parameters": it would fail the response.
    (
        "surrogate-unknown-key",
        b'{"prompt": "x", "script_args": [{"a": "\\udc00"}]}',
        "script_args.0.a",
    ),
    (
        "surrogate-override",
        b'{"prompt": "x", "override_settings": {"k": "\\ud800"}}',
        "override_settings.k",
    ),
    ("deep-unknown-key", b'{"prompt": "x", "extra": ' + nested(100).encode() + b"}", "levels deep"),
    ("deep-10000", nested(10_000).encode(), "too deep"),
    ("nan", b'{"prompt": "x", "cfg_scale": NaN}', "guidance_scale"),
    ("width-huge", json.dumps({**A1, "width": 10**9}).encode(), "width"),
    ("width-negative", json.dumps({**A1, "width": -64}).encode(), "width"),
    ("steps-huge", json.dumps({**A1, "steps": 10**12}).encode(), "steps"),
    ("batch-huge", json.dumps({**A1, "batch_size": 10**6}).encode(), "batch_size"),
    ("seed-huge", json.dumps({**A1, "seed": 10**30}).encode(), "seed"),
    ("prompt-list", json.dumps({**A1, "prompt": ["a"]}).encode(), "prompt"),
    ("body-array", b"[1]", "JSON object"),
    ("truncated", b'{"prompt": ', "not valid JSON"),
    ("not-utf8", b'{"prompt": "\xff"}', "UTF-8"),
]


@pytest.mark.parametrize(
    ("body", "says"), [pytest.param(*row[1:], id=row[0]) for row in A1111_ROWS]
)
@pytest.mark.usefixtures("untouched_device")
def test_a_bad_txt2img_body_is_a_400_in_a1111s_shape(
    client: httpx.Client, body: bytes, says: str
) -> None:
    detail = a1111_refusal(
        timed_post(client, TXT2IMG, content=body, headers=JSON), 400, "invalid_request"
    )
    assert says in detail


# -- uploads -------------------------------------------------------------------------------


@pytest.mark.usefixtures("untouched_device")
def test_an_image_whose_header_claims_too_many_pixels_is_refused_before_decoding(
    client: httpx.Client,
) -> None:
    # 20000x20000 = 400 megapixels, over server.max_input_megapixels (16) and Pillow's own bomb
    # limit; 8000x8000 = 64 megapixels, under Pillow's and over ours.
    for side in (20_000, 8_000):
        files = {"image": ("bomb.png", png_claiming(side, side), "image/png")}
        response = timed_post(client, EDITS, files=files, data={"prompt": "x"})
        assert "server.max_input_megapixels" in openai_refusal(
            response, 400, "invalid_request", "image"
        )


@pytest.mark.usefixtures("untouched_device")
def test_more_files_than_the_form_takes_are_refused(client: httpx.Client) -> None:
    files = [("image[]", (f"{i}.png", png(8, 8), "image/png")) for i in range(40)]
    response = timed_post(client, EDITS, files=files, data={"prompt": "x"})
    openai_refusal(response, 400, "invalid_request", "image")


@pytest.mark.usefixtures("untouched_device")
def test_more_fields_than_the_form_takes_are_refused(client: httpx.Client) -> None:
    fields = {f"f{i}": "1" for i in range(200)}
    files = {"image": ("a.png", png(), "image/png")}
    response = timed_post(client, EDITS, files=files, data={"prompt": "x", **fields})
    openai_refusal(response, 400, "invalid_request", "image")


@pytest.mark.usefixtures("untouched_device")
def test_a_batch_form_past_its_bounds_is_refused_naming_file(client: httpx.Client) -> None:
    jsonl = ("requests.jsonl", b'{"prompt": "x"}\n', "application/jsonl")
    many_files = [("file", jsonl) for _ in range(10)]
    openai_refusal(
        timed_post(client, "/v1/batches", files=many_files), 400, "invalid_request", "file"
    )
    many_fields = {f"f{i}": "1" for i in range(100)}
    response = timed_post(client, "/v1/batches", files={"file": jsonl}, data=many_fields)
    openai_refusal(response, 400, "invalid_request", "file")


@pytest.mark.usefixtures("untouched_device")
def test_an_image_that_is_not_one_is_a_400_naming_image(client: httpx.Client) -> None:
    files = {"image": ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")}
    response = timed_post(client, EDITS, files=files, data={"prompt": "x"})
    openai_refusal(response, 400, "invalid_request", "image")


@pytest.mark.parametrize(
    "raw", [b"\xed\xa0\x80", b"\xff\xfe", b"a\x00b"], ids=["surrogate", "ff", "nul"]
)
def test_bytes_that_are_not_utf8_in_a_form_field_are_no_server_error(
    client: httpx.Client, raw: bytes
) -> None:
    # A form cannot carry a JSON escape; raw bytes that are not UTF-8 are read by Starlette as
    # Latin-1 (its fallback for form text), so they arrive as text UTF-8 can write.
    files = {"image": ("a.png", png(), "image/png")}
    fields = {"prompt": raw, "steps": "1", "size": "64x64", "seed": "3"}
    response = client.post(EDITS, files=files, data=fields)  # type: ignore[arg-type]
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
