"""The A1111 API (/sdapi/v1) end to end against a live server (tiny-sdxl on CPU), driven by the
real `webuiapi` client with HTTP Basic auth, and by replayed bodies of SillyTavern and Open
WebUI: generation, models and options per key, lists, progress and interrupt per caller."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import webuiapi
from PIL import Image

from models.local import tiny_loras
from server import pngmeta
from tests.helpers_images import gradient, white_mask
from tests.helpers_server import (
    API_KEY,
    LiveServer,
    WatchedRunner,
    fresh_data_dir,
    live_server,
    metric_value,
    tiny_settings,
    watched_server,
)

OTHER_KEY = "other-key-9876543210"
SMALL: dict[str, Any] = {"steps": 2, "width": 64, "height": 64}

# SillyTavern's txt2img body (src/endpoints/stable-diffusion.js forwards the browser's body
# unchanged, its own url and auth included; ../shared/CLIENTS.md section 2).
SILLYTAVERN_BODY: dict[str, Any] = {
    "url": "http://127.0.0.1:7860",
    "auth": "",
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "blurry",
    "sampler_name": "DDIM",
    "scheduler": "normal",
    "steps": 2,
    "cfg_scale": 7,
    "width": 64,
    "height": 64,
    "restore_faces": False,
    "enable_hr": False,
    "hr_upscaler": "Latent",
    "hr_scale": 2,
    "hr_additional_modules": [],
    "denoising_strength": 0.7,
    "hr_second_pass_steps": 0,
    "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"},
    "override_settings_restore_afterwards": True,
    "clip_skip": 1,
    "save_images": True,
    "send_images": True,
    "do_not_save_grid": False,
    "do_not_save_samples": False,
}


@pytest.fixture(scope="module")
def watched(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[tuple[LiveServer, WatchedRunner]]:
    data = fresh_data_dir(tmp_path_factory.mktemp("a1111"), tiny_models_dir)
    tiny_loras.build_tiny_loras(data / "loras")
    with watched_server(tiny_settings(data, api_keys=[API_KEY, OTHER_KEY])) as live:
        yield live


def _api(server: LiveServer, key: str = API_KEY) -> webuiapi.WebUIApi:
    port = int(server.url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    api.set_auth("any-user", key)
    return api


def _basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"u:{key}".encode()).decode()}


def _client(server: LiveServer, key: str = API_KEY) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=_basic(key), timeout=120.0)


def _pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"))


def _titles(server: LiveServer) -> dict[str, str]:
    """Each listed model's A1111 title ("<name> [<short hash>]"), by model name."""
    with _client(server) as client:
        return {row["model_name"]: row["title"] for row in client.get("/sdapi/v1/sd-models").json()}


def _a1111_error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"}, body
    return dict(body)


def test_webuiapi_txt2img_seeds_reproduce_each_image_alone(server: LiveServer) -> None:
    api = _api(server)
    result = api.txt2img(
        prompt="a red cube",
        negative_prompt="blurry",
        seed=21,
        batch_size=2,
        sampler_name="Euler a",
        scheduler="automatic",
        cfg_scale=5.0,
        **SMALL,
    )
    info = result.info
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert info["seed"] == 21 and info["all_seeds"] == [21, 22]
    assert info["sampler_name"] == "Euler a" and info["steps"] == 2 and info["cfg_scale"] == 5.0
    assert info["sd_model_name"] == "tiny-sdxl" and info["batch_size"] == 2
    assert info["all_prompts"] == ["a red cube"] * 2 and info["negative_prompt"] == "blurry"
    assert len(info["infotexts"]) == 2 and "Seed: 22" in info["infotexts"][1]
    assert "Sampler: Euler a" in info["infotexts"][0]
    # webuiapi's hires-fix and sampler knobs are accepted and named as unused.
    assert {"hr_scale", "eta", "s_noise"} <= set(info["imagegen"]["ignored_params"])
    assert "sampler_name" not in info["imagegen"]["ignored_params"]
    assert result.parameters["prompt"] == "a red cube"
    for index, seed in enumerate(info["all_seeds"]):
        alone = api.txt2img(
            prompt="a red cube",
            negative_prompt="blurry",
            seed=seed,
            sampler_name="Euler a",
            cfg_scale=5.0,
            **SMALL,
        )
        assert alone.info["all_seeds"] == [seed]
        # Batched and alone differ by at most one level (CPU matmuls batch differently; the
        # same bound as the scheduler's batching test).
        difference = np.abs(_pixels(alone.image).astype(int) - _pixels(result.images[index]))
        assert difference.max() <= 1


def test_samplers_change_pixels_and_combined_names_match(server: LiveServer) -> None:
    api = _api(server)
    names = {s["name"] for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM"} <= names
    assert {s["name"] for s in api.get_schedulers()} == {"automatic", "karras"}
    common = {"prompt": "a blue sphere", "seed": 4, **SMALL}
    karras = api.txt2img(sampler_name="DPM++ 2M Karras", scheduler="automatic", **common)
    split = api.txt2img(sampler_name="DPM++ 2M", scheduler="karras", **common)
    plain = api.txt2img(sampler_name="DPM++ 2M", scheduler="automatic", **common)
    assert split.info["sampler_name"] == "DPM++ 2M Karras"
    np.testing.assert_array_equal(_pixels(karras.image), _pixels(split.image))
    assert plain.info["sampler_name"] == "DPM++ 2M"
    assert not np.array_equal(_pixels(plain.image), _pixels(karras.image))


def test_webuiapi_img2img_with_and_without_mask(server: LiveServer) -> None:
    api = _api(server)
    source = gradient(64, 64)
    plain = api.img2img(images=[source], prompt="a cat", seed=5, denoising_strength=0.5, **SMALL)
    assert plain.image.size == (64, 64)
    assert plain.info["denoising_strength"] == 0.5
    assert plain.parameters["init_images"] is None  # include_init_images is false

    mask = Image.open(io.BytesIO(white_mask(64, 64, (16, 16, 48, 48))))
    inpaint = api.img2img(
        images=[source], mask_image=mask, prompt="a cat", seed=5, denoising_strength=0.9, **SMALL
    )
    kept = _pixels(inpaint.image)[:8, :8].astype(int)
    assert np.abs(kept - _pixels(source)[:8, :8].astype(int)).max() <= 8  # outside: kept
    assert "Mask blur: 4" in inpaint.info["infotexts"][0]

    # inpainting_mask_invert on a mask is that mask's inverse sent plainly.
    inverse = Image.fromarray(255 - np.asarray(mask.convert("L")))
    flipped = api.img2img(
        images=[source],
        mask_image=mask,
        inpainting_mask_invert=1,
        prompt="a cat",
        seed=5,
        denoising_strength=0.9,
        **SMALL,
    )
    direct = api.img2img(
        images=[source], mask_image=inverse, prompt="a cat", seed=5, denoising_strength=0.9, **SMALL
    )
    np.testing.assert_array_equal(_pixels(flipped.image), _pixels(direct.image))
    assert not np.array_equal(_pixels(flipped.image), _pixels(inpaint.image))


def test_send_images_false_returns_none(server: LiveServer) -> None:
    with _client(server) as client:
        response = client.post(
            "/sdapi/v1/txt2img", json={"prompt": "x", "send_images": False, "seed": 1, **SMALL}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["images"] == []
    assert json.loads(body["info"])["all_seeds"] == [1]


def test_sillytavern_body_with_its_extra_keys(server: LiveServer) -> None:
    with _client(server) as client:
        response = client.post("/sdapi/v1/txt2img", json=SILLYTAVERN_BODY)
        assert response.status_code == 200, response.text
        body = response.json()
        (image,) = body["images"]
        assert not image.startswith("data:")
        with Image.open(io.BytesIO(base64.b64decode(image))) as decoded:
            assert decoded.format == "PNG" and decoded.size == (64, 64)
        info = json.loads(body["info"])
        assert info["sampler_name"] == "DDIM"
        ignored = set(info["imagegen"]["ignored_params"])
        assert {"url", "save_images", "scheduler", "override_settings.sd_vae"} <= ignored
        assert body["parameters"]["url"] == "http://127.0.0.1:7860"
        # set-model (the title from its model list), then its poll of /progress until idle.
        title = _titles(server)["tiny-sdxl"]
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).is_success
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["progress"] == 0 and progress["state"]["job_count"] == 0


def test_models_and_options_are_per_key(server: LiveServer) -> None:
    api, other = _api(server), _api(server, OTHER_KEY)
    titles = _titles(server)
    names = api.util_get_model_names()
    assert titles["tiny-sdxl"] in names and titles["tiny-flux"] in names
    assert api.util_get_current_model() == titles["tiny-sdxl"]
    try:
        api.util_set_model("tiny-flux")
        assert api.util_get_current_model() == titles["tiny-flux"]
        assert other.util_get_current_model() == titles["tiny-sdxl"]
    finally:
        api.util_set_model("tiny-sdxl")
    api.util_set_model("tiny-flux")
    # Open WebUI echoes the whole dict it fetched, with the checkpoint replaced.
    with _client(server) as client:
        echoed = {**client.get("/sdapi/v1/options").json(), "sd_model_checkpoint": "TINY-SDXL"}
        assert client.post("/sdapi/v1/options", json=echoed).status_code == 200
        current = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        assert current == titles["tiny-sdxl"]
        unknown = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope [abc]"})
    assert unknown.status_code == 404
    assert "sd-models" in _a1111_error(unknown)["detail"]


def test_checkpoint_hashes_are_the_weights_revision(tmp_path: Path, tiny_models_dir: Path) -> None:
    """Titles, hashes, sd_checkpoint_hash and info.sd_model_hash are the revision of the weights
    that the cache key and the PNG metadata carry: its sha256, the first 10 digits the short
    hash. A hosted model has none, nor a built-in one not built yet (it is not built to be
    named). A title, name, short hash or sha256 picks a model."""
    data = fresh_data_dir(tmp_path, tiny_models_dir)
    unbuilt = data / "models" / "tiny-flux-fill"
    shutil.rmtree(unbuilt)
    settings = tiny_settings(data, top={"providers": {"stability": {"api_key": "k-never-used"}}})
    with live_server(settings) as live, httpx.Client(base_url=live.url, timeout=120.0) as client:
        generated = client.post("/sdapi/v1/txt2img", json={"prompt": "a kite", **SMALL}).json()
        record = pngmeta.read(base64.b64decode(generated["images"][0]))[1] or {}
        revision = str(record["model_revision"])
        assert revision.startswith("sha256:")
        sha256 = revision.removeprefix("sha256:")
        assert len(sha256) == 64
        assert json.loads(generated["info"])["sd_model_hash"] == sha256[:10]

        rows = {row["model_name"]: row for row in client.get("/sdapi/v1/sd-models").json()}
        sdxl, flux, hosted = rows["tiny-sdxl"], rows["tiny-flux"], rows["stability-core"]
        assert (sdxl["title"], sdxl["hash"], sdxl["sha256"]) == (
            f"tiny-sdxl [{sha256[:10]}]",
            sha256[:10],
            sha256,
        )
        assert (hosted["title"], hosted["hash"], hosted["sha256"]) == ("stability-core", None, None)
        assert rows["tiny-flux-fill"]["hash"] is None and not unbuilt.exists()
        options = client.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == sdxl["title"]
        assert options["sd_checkpoint_hash"] == sha256

        assert flux["hash"] not in (None, sdxl["hash"]) and len(flux["sha256"]) == 64
        for text in (
            flux["title"],
            "TINY-FLUX",
            flux["hash"],
            flux["sha256"],
            f"sha256:{flux['hash']}",
        ):
            reset = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"})
            assert reset.is_success
            chosen = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": text})
            assert chosen.status_code == 200, (text, chosen.text)
            current = client.get("/sdapi/v1/options").json()
            assert current["sd_model_checkpoint"] == flux["title"], text
            assert current["sd_checkpoint_hash"] == flux["sha256"]
        # tiny-flux is the default now; the aliases of tiny-sdxl share its hash, and the
        # model itself is what the hash names.
        override = {"sd_model_checkpoint": sdxl["hash"]}
        by_hash = client.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "a kite", "override_settings": override, "send_images": False, **SMALL},
        )
        assert json.loads(by_hash.json()["info"])["sd_model_name"] == "tiny-sdxl"
        unknown = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "0123456789"})
        assert unknown.status_code == 404


def test_a_callers_model_outlives_a_restart(tmp_path: Path, tiny_models_dir: Path) -> None:
    """POST /options is kept in the server's database per key: a new server on the same data
    directory answers with it for that key only; a model gone from the catalogue since falls
    back to the server's default."""
    data = fresh_data_dir(tmp_path, tiny_models_dir)
    third = "third-key-5555555555"

    def settings(*models: dict[str, Any]) -> Any:
        keys = [API_KEY, OTHER_KEY, third]
        return tiny_settings(data, api_keys=keys, models=[], top={"models": list(models)})

    own = {"name": "own-sdxl", "kind": "sdxl", "source": "builtin:tiny-sdxl"}
    with live_server(settings(own)) as live:
        titles = _titles(live)
        with _client(live) as mine, _client(live, third) as gone:
            assert mine.post(
                "/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-flux"}
            ).is_success
            assert gone.post(
                "/sdapi/v1/options", json={"sd_model_checkpoint": "own-sdxl"}
            ).is_success
            assert gone.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles["own-sdxl"]
    with live_server(settings()) as again:
        options = {}
        for key in (API_KEY, OTHER_KEY, third):
            with _client(again, key) as client:
                options[key] = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert options == {
        API_KEY: titles["tiny-flux"],
        OTHER_KEY: titles["tiny-sdxl"],
        third: titles["tiny-sdxl"],
    }


def test_per_request_checkpoint_override(server: LiveServer) -> None:
    with _client(server) as client:
        missing = client.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}, **SMALL},
        )
    assert missing.status_code == 404
    assert "sd_model_checkpoint" in _a1111_error(missing)["detail"]


def test_loras_listed(server: LiveServer) -> None:
    listed = {row["name"]: row for row in _api(server).get_loras()}
    expected = {row["name"] for row in server.service.loras()}
    assert set(listed) == expected and "tiny-sdxl-kohya" in listed
    assert set(listed["tiny-sdxl-kohya"]) == {"name", "alias", "path", "metadata"}


def test_errors_in_a1111_shape(server: LiveServer) -> None:
    with _client(server) as client:
        sampler = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Zzz"})
        too_many = client.post(
            "/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 4, "n_iter": 3}
        )
        route = client.get("/sdapi/v1/hypernetworks")
        no_image = client.post("/sdapi/v1/img2img", json={"prompt": "x"})
    assert sampler.status_code == 404
    assert _a1111_error(sampler)["detail"].startswith("Sampler not found")
    assert too_many.status_code == 400
    assert "batch_size x n_iter" in _a1111_error(too_many)["detail"]
    assert route.status_code == 404 and "hypernetworks" in _a1111_error(route)["detail"]
    assert no_image.status_code == 400 and "init_images" in _a1111_error(no_image)["detail"]
    for path in ("/sdapi/v1/scripts", "/sdapi/v1/upscalers", "/sdapi/v1/sd-vae"):
        assert _client(server).get(path).status_code == 200


def test_a_body_past_the_limit_is_a1111s_413(tmp_path: Path, tiny_models_dir: Path) -> None:
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir), max_body_mb=0.01, models=[])
    big = json.dumps({"prompt": "x", "init_images": ["A" * 20_000]}).encode()
    with live_server(settings) as live, live.client() as client:
        declared = client.post(
            "/sdapi/v1/img2img", content=big, headers={"Content-Type": "application/json"}
        )
        # Chunked: no Content-Length to go by, cut off once it passes the limit.
        chunked = client.post(
            "/sdapi/v1/img2img",
            content=(big[i : i + 4096] for i in range(0, len(big), 4096)),
            headers={"Content-Type": "application/json"},
        )
    for response in (declared, chunked):
        assert response.status_code == 413
        error = _a1111_error(response)
        assert error["error"] == "request_too_large" and "server.max_body_mb" in error["detail"]


def test_basic_auth(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        missing = client.get("/sdapi/v1/options")
        # "Basic " with nothing after it (h11 trims the space, as servers do on receipt).
        empty = client.get("/sdapi/v1/options", headers={"Authorization": "Basic"})
        wrong = client.get("/sdapi/v1/options", headers=_basic("wrong"))
        bare = client.get(
            "/sdapi/v1/options",
            headers={"Authorization": "Basic " + base64.b64encode(API_KEY.encode()).decode()},
        )
        bearer = client.get("/sdapi/v1/options", headers={"Authorization": f"Bearer {API_KEY}"})
        openai_route = client.get("/v1/models", headers=_basic(API_KEY))
    assert missing.status_code == 401 and empty.status_code == 401 and wrong.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Basic")
    assert "set_auth" in _a1111_error(missing)["detail"]
    assert bare.status_code == 200 and bearer.status_code == 200
    assert openai_route.status_code == 200


def test_open_webui_sequence_with_keys_off(tmp_path: Path, tiny_models_dir: Path) -> None:
    """Open WebUI's automatic1111 engine, replayed: it sends an empty Basic header on every
    call (ignored with keys off), reads options and sd-models, generates, and echoes the whole
    options dict back to change the model."""
    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir))
    # "Basic " with nothing after it (h11 trims the space, as servers do on receipt).
    with (
        live_server(settings) as live,
        httpx.Client(
            base_url=live.url, headers={"authorization": "Basic"}, timeout=120.0
        ) as client,
    ):
        options = client.get("/sdapi/v1/options")
        assert options.status_code == 200
        models = client.get("/sdapi/v1/sd-models").json()
        assert {"title", "model_name"} <= set(models[0])
        titles = {row["model_name"]: row["title"] for row in models}
        assert options.json()["sd_model_checkpoint"] == titles["tiny-sdxl"]
        body = {"prompt": "a kite", "batch_size": 1, "width": 64, "height": 64, "steps": 2}
        generated = client.post("/sdapi/v1/txt2img", json={**body, "negative_prompt": "rain"})
        assert generated.status_code == 200, generated.text
        assert len(generated.json()["images"]) == 1
        assert json.loads(generated.json()["info"])["negative_prompt"] == "rain"
        echoed = {**options.json(), "sd_model_checkpoint": titles["tiny-flux"]}
        assert client.post("/sdapi/v1/options", json=echoed).status_code == 200
        current = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        assert current == titles["tiny-flux"]


def test_progress_and_interrupt_touch_only_the_callers_work(
    server: LiveServer, device: WatchedRunner
) -> None:
    api, other = _api(server), _api(server, OTHER_KEY)
    assert api.get_progress()["state"]["job_count"] == 0
    outcome: dict[str, Any] = {}

    def generate() -> None:
        with _client(server) as client:
            outcome["response"] = client.post(
                "/sdapi/v1/txt2img",
                json={"prompt": "held", "seed": 9, "force_task_id": "task-a", **SMALL},
            )

    device.hold()
    worker = threading.Thread(target=generate)
    worker.start()
    try:
        assert device.holding.wait(60)
        mine = api.get_progress()
        assert mine["state"]["job_count"] == 1 and mine["current_task"] == "task-a"
        assert mine["state"]["sampling_step"] == 1 and mine["state"]["sampling_steps"] == 2
        assert 0 < mine["progress"] <= 1
        assert other.get_progress()["state"]["job_count"] == 0
        assert other.interrupt() == {}  # someone else's interrupt stops nothing of ours
        assert api.get_progress()["state"]["job_count"] == 1
        assert api.interrupt() == {}
    finally:
        device.release()
        worker.join(60)
    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert response.json()["images"] == []
    assert json.loads(response.json()["info"])["interrupted"] is True
    api.util_wait_for_ready(check_interval=0.05)


def test_a_full_queue_is_waited_out_not_refused(tmp_path: Path, tiny_models_dir: Path) -> None:
    """One image of queue and the worker held busy (its control channel blocks on an Event):
    an OpenAI request beyond it is a 429, an A1111 one waits and then succeeds."""
    settings = tiny_settings(
        fresh_data_dir(tmp_path, tiny_models_dir),
        local={"max_queue_images": 1, "batch_window_ms": 0},
    )
    with live_server(settings) as live:
        release = threading.Event()
        live.service.registry.worker.call(release.wait)
        responses: dict[str, httpx.Response] = {}

        def post(name: str, path: str, body: dict[str, Any]) -> None:
            with live.client(timeout=120.0) as client:
                responses[name] = client.post(path, json=body)

        filler = threading.Thread(
            target=post, args=("filler", "/v1/images/generations", {"prompt": "f", "steps": 2})
        )
        filler.start()
        a1111 = threading.Thread(
            target=post, args=("a1111", "/sdapi/v1/txt2img", {"prompt": "w", **SMALL})
        )
        try:
            with live.client() as client:
                deadline = time.monotonic() + 30
                while metric_value(client.get("/metrics").text, "imagegen_queue_depth_images") != 1:
                    assert time.monotonic() < deadline, "the filler never queued"
                    time.sleep(0.02)
                refused = client.post("/v1/images/generations", json={"prompt": "r", "steps": 2})
                assert refused.status_code == 429
                a1111.start()
                # It has met the full queue (and been told 429 inside), yet not answered.
                while not metric_value(
                    client.get("/metrics").text,
                    "imagegen_requests_total",
                    endpoint="a1111_txt2img",
                    status="429",
                ):
                    assert time.monotonic() < deadline, "the A1111 call never met the full queue"
                    time.sleep(0.02)
                assert "a1111" not in responses
        finally:
            release.set()
            filler.join(60)
            if a1111.ident is not None:
                a1111.join(60)
    assert responses["filler"].status_code == 200
    assert responses["a1111"].status_code == 200, responses["a1111"].text
    assert len(responses["a1111"].json()["images"]) == 1
