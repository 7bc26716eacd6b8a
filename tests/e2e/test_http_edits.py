"""POST /v1/images/edits as OpenAI defines it, against a live server: the official `openai`
SDK's `images.edit` unchanged (one image, a list, a mask), the imagegen extension fields as
form fields, every malformed upload a 400 naming its field, and edits as jobs."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from tests.helpers_images import alpha_mask, gradient, header_only_png, png
from tests.helpers_server import (
    API_KEY,
    LiveServer,
    fresh_data_dir,
    live_server,
    tiny_settings,
)

SIZE = 64
IMAGE = png(gradient(SIZE, SIZE))
# The centre square is transparent: the area OpenAI's convention says to edit.
BOX = (16, 16, 48, 48)
MASK = alpha_mask(SIZE, SIZE, BOX)
EXTRA = {"seed": 5, "steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("edits"), tiny_models_dir)
    settings = tiny_settings(data, api_keys=[API_KEY], max_input_megapixels=1.0)
    with live_server(settings) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(API_KEY) as c:
        yield c


def sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def decoded(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def edit(client: httpx.Client, files: Any, **fields: str) -> httpx.Response:
    data = {"prompt": "a lighthouse", "model": "tiny-sdxl", "seed": "5", "steps": "2", **fields}
    return client.post("/v1/images/edits", data=data, files=files)


def refused(response: httpx.Response, param: str | None, status: int = 400) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return str(error["message"])


# -- the SDK, unchanged (these need the local img2img/inpaint pipelines) ----------------------


def test_sdk_edit_with_one_image(server: LiveServer) -> None:
    client = sdk(server)
    result = client.images.edit(
        model="tiny-sdxl",
        image=("in.png", IMAGE, "image/png"),
        prompt="a lighthouse at dusk",
        size=f"{SIZE}x{SIZE}",
        response_format="b64_json",
        extra_body={**EXTRA, "strength": 0.6},
    )
    assert result.data is not None and len(result.data) == 1
    assert decoded(result.data[0].b64_json).size == (SIZE, SIZE)
    assert result.data[0].model_extra is not None and result.data[0].model_extra["seed"] == 5
    # The same image, seed and strength again: the cache's answer, byte for byte.
    again = client.images.with_raw_response.edit(
        model="tiny-sdxl",
        image=("in.png", IMAGE, "image/png"),
        prompt="a lighthouse at dusk",
        size=f"{SIZE}x{SIZE}",
        extra_body={**EXTRA, "strength": 0.6},
    )
    assert again.headers["X-Imagegen-Cache"] == "hit"
    parsed = again.parse()
    assert parsed.data is not None and parsed.data[0].b64_json == result.data[0].b64_json


def test_sdk_edit_with_a_mask_keeps_pixels_outside_it(server: LiveServer) -> None:
    result = sdk(server).images.edit(
        model="tiny-sdxl",
        # Raw bytes: the SDK names the part "upload" with no useful type; the server sniffs.
        image=IMAGE,
        mask=MASK,
        prompt="a red door",
        extra_body=EXTRA,
    )
    assert result.data is not None
    out = decoded(result.data[0].b64_json).convert("RGB")
    source = gradient(SIZE, SIZE)
    assert out.size == source.size  # no size: the image's own
    assert out.getpixel((2, 2)) == source.getpixel((2, 2))  # outside the transparent box
    inside = [(x, y) for x in range(20, 44, 4) for y in range(20, 44, 4)]
    assert any(out.getpixel(p) != source.getpixel(p) for p in inside)


def test_sdk_edit_with_a_list_of_images(server: LiveServer) -> None:
    other = png(gradient(SIZE, SIZE).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    result = sdk(server).images.edit(
        model="tiny-sdxl",
        image=[("a.png", IMAGE, "image/png"), other],
        prompt="two lighthouses",
        size=f"{SIZE}x{SIZE}",
        extra_body=EXTRA,
    )
    assert result.data is not None and result.data[0].b64_json


# -- the SDK's list reaches the server as image[] parts: every one is read --------------------


def test_sdk_list_with_a_bad_second_image_is_a_400_naming_image(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(server).images.edit(
            model="tiny-sdxl",
            image=[("a.png", IMAGE, "image/png"), ("b.png", b"not a picture", "image/png")],
            prompt="x",
        )
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "image"
    assert "not an image" in body["message"]


def test_sdk_mask_of_the_wrong_size_is_a_400_naming_mask(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(server).images.edit(
            model="tiny-sdxl", image=IMAGE, mask=alpha_mask(32, 32, (0, 0, 8, 8)), prompt="x"
        )
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "mask"
    assert "32x32" in body["message"] and "64x64" in body["message"]


# -- malformed uploads ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upload", "words"),
    [
        pytest.param(b"hello, this is text\n", "not an image", id="text-file"),
        pytest.param(IMAGE[: len(IMAGE) // 2], "truncated", id="truncated-png"),
        pytest.param(header_only_png(20000, 20000), "server.max_input_megapixels", id="huge"),
        pytest.param(b"", "empty", id="empty-file"),
    ],
)
def test_malformed_uploads_are_400s_naming_image(
    client: httpx.Client, upload: bytes, words: str
) -> None:
    # The filename and part type claim a PNG: only the bytes count.
    response = edit(client, {"image": ("in.png", upload, "image/png")})
    assert words in refused(response, "image")


def test_a_mask_that_is_not_an_image_or_has_no_transparency_is_a_400(
    client: httpx.Client,
) -> None:
    response = edit(client, {"image": ("in.png", IMAGE), "mask": ("m.png", b"text")})
    assert "not an image" in refused(response, "mask")
    opaque = png(Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255)))
    response = edit(client, {"image": ("in.png", IMAGE), "mask": ("m.png", opaque)})
    assert "transparent" in refused(response, "mask")


def test_form_shape_errors_name_the_field(client: httpx.Client) -> None:
    # No image at all (a urlencoded form, and a multipart one).
    response = client.post("/v1/images/edits", data={"prompt": "x"})
    assert "image is required" in refused(response, "image")
    response = client.post(
        "/v1/images/edits", files={"prompt": (None, "x"), "model": (None, "tiny-sdxl")}
    )
    assert "image is required" in refused(response, "image")
    # An image sent as text, and a text field sent as a file.
    response = client.post(
        "/v1/images/edits", files={"prompt": (None, "x"), "image": (None, "aGVsbG8=")}
    )
    assert "file part" in refused(response, "image")
    response = edit(client, {"image": ("in.png", IMAGE), "seed": ("s.txt", b"5")})
    assert "text field" in refused(response, "seed")
    response = edit(client, {"image": ("in.png", IMAGE), "extra": ("x.txt", b"")})
    assert "text field" in refused(response, "extra")
    # Two masks.
    files = [("image", ("in.png", IMAGE)), ("mask", ("a.png", MASK)), ("mask[]", ("b.png", MASK))]
    assert "one mask" in refused(edit(client, files), "mask")


def test_form_values_are_coerced_and_bad_ones_named(client: httpx.Client) -> None:
    files = {"image": ("in.png", IMAGE)}
    assert "seed" in refused(edit(client, files, seed="five"), "seed")
    assert refused(edit(client, files, n="0"), "n")
    assert "strength" in refused(edit(client, files, strength="1.5"), "strength")
    assert refused(edit(client, files, resize_mode="squash"), "resize_mode")
    assert refused(edit(client, files, inpaint_area="most"), "inpaint_area")
    assert refused(edit(client, files, input_fidelity="medium"), "input_fidelity")
    assert refused(edit(client, files, size="big"), "size")
    assert "stream" in refused(edit(client, files, stream="maybe"), "stream")
    # Unknown fields are refused by name, as in the JSON schema.
    assert "negative" in refused(edit(client, files, negative="blurry"), "negative")


def test_too_many_files_is_a_400_naming_image(client: httpx.Client) -> None:
    files = [("image[]", (f"{i}.png", IMAGE)) for i in range(18)]
    message = refused(edit(client, files), "image")
    assert "16 images" in message


def test_an_upload_past_the_body_limit_is_413(tmp_path: Path, tiny_models_dir: Path) -> None:
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir), max_body_mb=0.01, models=[])
    with live_server(settings) as live, live.client() as c:
        response = edit(c, {"image": ("in.png", os.urandom(64 * 1024))})
        assert response.status_code == 413
        assert "server.max_body_mb" in response.json()["error"]["message"]


def test_loras_form_field_is_json_text(client: httpx.Client) -> None:
    files = {"image": ("in.png", IMAGE)}
    assert "JSON text" in refused(edit(client, files, loras="watercolor:0.5"), "loras")
    bad_weight = json.dumps([{"name": "w", "weight": "heavy"}])
    assert refused(edit(client, files, loras=bad_weight), "loras.0.weight")
    extra_key = json.dumps([{"name": "w", "scale": 1}])
    assert refused(edit(client, files, loras=extra_key), "loras.0.scale")


# -- generations: loras yes, image fields no --------------------------------------------------


def test_generations_refuse_image_fields_with_a_pointer(client: httpx.Client) -> None:
    for field, value in (("image", "aGVsbG8="), ("strength", 0.5), ("mask_blur", 4)):
        response = client.post(
            "/v1/images/generations", json={"prompt": "x", field: value, "model": "tiny-sdxl"}
        )
        assert "/v1/images/edits" in refused(response, field)


def test_generations_take_loras_strictly(client: httpx.Client) -> None:
    # JSON is strict: the list itself, not JSON text.
    response = client.post(
        "/v1/images/generations", json={"prompt": "x", "loras": '[{"name": "a"}]'}
    )
    refused(response, "loras")
    response = client.post(
        "/v1/images/generations", json={"prompt": "x", "loras": [{"name": "a", "weight": 1}]}
    )
    # Not a file of the library: refused by name before any model work.
    assert "'a'" in refused(response, "loras")


# -- edits as jobs ----------------------------------------------------------------------------


def job_events(client: httpx.Client, job_id: str) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    kind = ""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                found.append((kind, json.loads(line.removeprefix("data: "))))
    return found


def test_an_edit_job_from_the_multipart_form(client: httpx.Client) -> None:
    created = client.post(
        "/v1/jobs",
        # strength 0.75 (the default) of 4 steps: the 3 that run are the progress total.
        data={"prompt": "a red door", "model": "tiny-sdxl", "seed": "3", "steps": "4"},
        files={"image": ("in.png", IMAGE), "mask": ("m.png", MASK)},
    )
    assert created.status_code == 202, created.text
    seen = job_events(client, created.json()["id"])
    assert seen[-1][0] == "completed", seen
    assert [data["total"] for kind, data in seen if kind == "progress"][-1:] == [3]
    out = decoded(seen[-1][1]["result"]["data"][0]["b64_json"])
    assert out.size == (SIZE, SIZE)


def test_an_edit_job_from_json_with_base64_images(client: httpx.Client) -> None:
    body = {
        "prompt": "a red door",
        "model": "tiny-sdxl",
        "seed": 3,
        "steps": 2,
        "image": base64.b64encode(IMAGE).decode(),
        "mask": "data:image/png;base64," + base64.b64encode(MASK).decode(),
    }
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    seen = job_events(client, created.json()["id"])
    assert seen[-1][0] == "completed", seen


def test_edit_jobs_refuse_bad_inputs_at_submit(client: httpx.Client) -> None:
    text = base64.b64encode(b"hello").decode()
    response = client.post("/v1/jobs", json={"prompt": "x", "image": text})
    assert "not an image" in refused(response, "image")
    response = client.post("/v1/jobs", json={"prompt": "x", "image": "%%%"})
    assert "base64" in refused(response, "image")
    response = client.post("/v1/jobs", json={"prompt": "x", "image": [1]})
    refused(response, "image")
    response = client.post("/v1/jobs", json={"prompt": "x", "mask": text})
    assert "needs an image" in refused(response, "mask")
    response = client.post("/v1/jobs", files={"prompt": (None, "x"), "image": ("a.png", b"x")})
    assert "not an image" in refused(response, "image")


def test_an_edit_job_can_be_cancelled(client: httpx.Client) -> None:
    created = client.post(
        "/v1/jobs",
        data={"prompt": "a slow edit", "model": "tiny-sdxl", "steps": "200"},
        files={"image": ("in.png", IMAGE)},
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: progress"):
                break
    cancelled = client.delete(f"/v1/jobs/{job_id}")
    assert cancelled.json()["status"] == "cancelled"
    assert [kind for kind, _ in job_events(client, job_id)] == ["cancelled"]


# -- Kontext and LoRA through HTTP (these need the Kontext pipeline and the LoRA library) -----


def test_kontext_edit_through_http(client: httpx.Client) -> None:
    response = client.post(
        "/v1/images/edits",
        data={"prompt": "make it night", "model": "tiny-flux-kontext", "seed": "1", "steps": "2"},
        files={"image": ("in.png", IMAGE, "image/png")},
    )
    assert response.status_code == 200, response.text
    assert response.json()["imagegen"]["model"] == "tiny-flux-kontext"
    assert decoded(response.json()["data"][0]["b64_json"]).size == (SIZE, SIZE)


@pytest.fixture(scope="module")
def lora_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[LiveServer]:
    from models.local.tiny_loras import build_tiny_loras

    data = fresh_data_dir(tmp_path_factory.mktemp("edit-loras"), tiny_models_dir)
    build_tiny_loras(data / "loras")
    settings = tiny_settings(data, local={"lora_dir": str(data / "loras")})
    with live_server(settings) as live:
        yield live


def test_lora_by_form_field_and_by_prompt_tag(lora_server: LiveServer) -> None:
    files = {"image": ("in.png", IMAGE)}
    with lora_server.client() as c:
        plain = edit(c, files)
        by_field = edit(c, files, loras=json.dumps([{"name": "tiny-sdxl-a", "weight": 0.8}]))
        by_tag = edit(c, files, prompt="a lighthouse <lora:tiny-sdxl-a:0.8>")
        for response in (plain, by_field, by_tag):
            assert response.status_code == 200, response.text
        image = [r.json()["data"][0]["b64_json"] for r in (plain, by_field, by_tag)]
        # The tag leaves the prompt: the same request as the field, so the same pixels.
        assert image[1] == image[2] and image[0] != image[1]
        assert by_tag.json()["data"][0]["revised_prompt"] == "a lighthouse"
