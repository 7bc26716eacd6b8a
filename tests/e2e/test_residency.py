"""Model residency over HTTP, on the tiny models: with a device budget that holds two of three
models and one of them pinned, requests that alternate across the three all succeed, the pinned
model stays on the device, and /v1/models, /v1/stats and /metrics say where each model is and
what the device holds."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers_images import alpha_mask, gradient, png
from tests.helpers_server import (
    LiveServer,
    fresh_data_dir,
    live_server,
    metric_value,
    tiny_settings,
)

# Measured footprints of the tiny models (float32 on the CPU): tiny-sdxl and
# tiny-sdxl-inpaint about 5.1 MB each, tiny-flux about 0.6 MB. 10.5 MB holds the two SDXL
# models, or one of them and tiny-flux, never all three.
BUDGET_GB = 10.5e6 / 1024**3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("residency"), tiny_models_dir)
    settings = tiny_settings(
        data,
        models=[],
        local={"memory_gb": BUDGET_GB, "model_policies": {"tiny-sdxl": {"pinned": True}}},
    )
    with live_server(settings) as live:
        yield live


def generate(http: httpx.Client, model: str, seed: int) -> httpx.Response:
    body = {"model": model, "prompt": "a boat", "size": "64x64", "seed": seed, "steps": 2}
    if model == "tiny-sdxl-inpaint":
        files = {
            "image": ("in.png", png(gradient(64, 64))),
            "mask": ("mask.png", alpha_mask(64, 64, (16, 16, 48, 48))),
        }
        fields = {k: str(v) for k, v in body.items()}
        return http.post("/v1/images/edits", data=fields, files=files)
    return http.post("/v1/images/generations", json=body)


def places(http: httpx.Client) -> dict[str, Any]:
    return {
        card["id"]: card
        for card in http.get("/v1/models").json()["data"]
        if card["id"].startswith("tiny-")
    }


def test_three_models_in_room_for_two_with_one_pinned(server: LiveServer) -> None:
    with server.client() as http:
        # The pinned model was loaded at start-up.
        assert places(http)["tiny-sdxl"]["where"] == "device"
        order = ["tiny-sdxl-inpaint", "tiny-flux", "tiny-sdxl", "tiny-sdxl-inpaint", "tiny-flux"]
        for seed, model in enumerate(order * 2):
            response = generate(http, model, seed)
            assert response.status_code == 200, response.text
            assert base64.b64decode(response.json()["data"][0]["b64_json"])
            cards = places(http)
            assert cards["tiny-sdxl"]["where"] == "device"
            assert cards[model]["where"] == "device"
            on_device = [c for c in cards.values() if c["where"] == "device"]
            assert sum(c["footprint_bytes"] for c in on_device) <= BUDGET_GB * 1024**3
        cards = places(http)
        assert cards["tiny-sdxl"]["pinned"] is True and cards["tiny-flux"]["pinned"] is False
        assert cards["tiny-sdxl"]["footprint_bytes"] > cards["tiny-flux"]["footprint_bytes"] > 0
        assert cards["tiny-sdxl"]["device"] == "cpu"  # "auto", as it resolved
        (device,) = http.get("/v1/stats").json()["devices"]
        assert device["budget_bytes"] == int(BUDGET_GB * 1024**3)
        assert device["evictions"] >= 4
        assert 0 < device["used_bytes"] <= device["budget_bytes"]
        text = http.get("/metrics").text
        assert metric_value(text, "imagegen_device_memory_bytes", kind="budget") == int(
            BUDGET_GB * 1024**3
        )
        assert metric_value(text, "imagegen_model_memory_bytes", model="tiny-sdxl") > 0


def test_a_job_says_when_its_model_is_loading(server: LiveServer) -> None:
    release = threading.Event()
    with server.client() as http:
        # A model not loaded yet (the test above never asks for it), its load held up
        # behind other work on the device.
        assert places(http)["tiny-flux-kontext"]["where"] == "disk"
        server.service.registry.worker.call(release.wait)
        # Only stops a hung test: without a "loading" event the job still ends, and fails it.
        deadline = threading.Timer(60, release.set)
        deadline.start()
        try:
            body = {
                "model": "tiny-flux-kontext",
                "prompt": "make it blue",
                "size": "64x64",
                "steps": 2,
                "image": base64.b64encode(png(gradient(64, 64))).decode(),
            }
            job = http.post("/v1/jobs", json=body).json()
            with http.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60) as events:
                kinds = []
                for line in events.iter_lines():
                    if line.startswith("event: "):
                        kinds.append(line.removeprefix("event: "))
                        if kinds[-1] == "loading":
                            release.set()
                        if kinds[-1] in ("completed", "failed", "cancelled"):
                            break
        finally:
            release.set()
            deadline.cancel()
    assert "loading" in kinds and kinds[-1] == "completed"
    assert kinds.index("loading") < kinds.index("started")


def test_every_listing_says_where_each_model_is_and_what_the_device_holds(
    server: LiveServer, cli_env: dict[str, str]
) -> None:
    with server.client() as http:
        assert generate(http, "tiny-flux", 40).status_code == 200
        listing = http.get("/v1/models").json()
        a1111 = {row["model_name"]: row for row in http.get("/sdapi/v1/sd-models").json()}
    # /v1/models: each model's place, and each device's budget, used and free.
    (device,) = listing["devices"]
    assert device["device"] == "cpu"
    assert device["free_bytes"] == device["budget_bytes"] - device["used_bytes"] > 0
    cards = {card["id"]: card for card in listing["data"]}
    assert cards["tiny-flux"]["where"] == "device" and cards["tiny-flux"]["mode"] == "whole"
    # A1111's list keeps its shape, with the same facts in a key of its own.
    flux = a1111["tiny-flux"]
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(flux)
    assert flux["imagegen"]["where"] == "device"
    assert flux["imagegen"]["footprint_bytes"] == cards["tiny-flux"]["footprint_bytes"] > 0
    # `imagegen models --server` reads the running server's list (this process loads nothing).
    from tests.helpers_cli import imagegen_process as imagegen

    proc = imagegen(cli_env, "models", "--server", server.url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["devices"][0]["device"] == "cpu"
    table = imagegen(cli_env, "models", "--server", server.url)
    assert table.returncode == 0, table.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in table.stdout.splitlines()}
    assert rows["tiny-flux"][4] == "device" and rows["tiny-flux"][5] == "cpu"
    # Sizes for a person: the tiny models' in MB.
    assert rows["tiny-flux"][6] == f"{cards['tiny-flux']['footprint_bytes'] / 1024**2:.1f} MB"
    assert rows["device"][:4] == ["device", "budget", "used", "free"]
    assert rows["cpu"][1] == f"{device['budget_bytes'] / 1024**2:.1f} MB"


def test_models_server_errors_are_one_line_with_the_fix(cli_env: dict[str, str]) -> None:
    import socket

    from tests.helpers_cli import imagegen_process as imagegen

    with socket.socket() as sock:  # a loopback port nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = imagegen(cli_env, "models", "--server", f"http://127.0.0.1:{port}")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "cannot reach" in line and "imagegen serve" in line


def test_models_server_asks_for_the_key_a_keyed_server_wants(
    tmp_path: Path, tiny_models_dir: Path, cli_env: dict[str, str]
) -> None:
    from tests.helpers_cli import imagegen_process as imagegen

    settings = tiny_settings(fresh_data_dir(tmp_path, tiny_models_dir), api_keys=["sk-listing"])
    with live_server(settings) as keyed:
        refused = imagegen(cli_env, "models", "--server", keyed.url)
        allowed = imagegen(
            {**cli_env, "IMAGEGEN_API_KEY": "sk-listing"}, "models", "--server", keyed.url
        )
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "--api-key" in line and "IMAGEGEN_API_KEY" in line
    assert allowed.returncode == 0, allowed.stderr
    assert "tiny-sdxl" in allowed.stdout
