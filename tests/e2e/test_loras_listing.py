"""The LoRA library on the surfaces that list it: GET /v1/loras (behind the API key, like
/v1/models) and `imagegen loras` (tab-separated when piped, --json), the same rows on both."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.local import tiny_loras
from tests.helpers_server import API_KEY, fresh_data_dir, live_server, tiny_settings


def test_loras_listed_over_http_and_the_cli(tmp_path: Path, cli_env: dict[str, str]) -> None:
    data = Path(cli_env["IMAGEGEN_DATA_DIR"])
    files = tiny_loras.build_tiny_loras(data / "loras")
    (data / "loras" / "legacy.ckpt").write_bytes(b"\x80\x04")  # never listed
    expected = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}

    settings = tiny_settings(data, api_keys=[API_KEY], models=[])
    with live_server(settings) as server:
        with server.client() as client:
            assert client.get("/v1/loras").status_code == 401
        with server.client(API_KEY) as client:
            response = client.get("/v1/loras")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert {name: card["sha256"] for name, card in cards.items()} == expected
    assert cards["tiny-sdxl-kohya"] == {
        "id": "tiny-sdxl-kohya",
        "object": "lora",
        "family": "sdxl",
        "format": "kohya",
        "sha256": expected["tiny-sdxl-kohya"],
        "size_bytes": files["tiny-sdxl-kohya"].stat().st_size,
    }
    assert cards["tiny-flux-a"]["family"] == "flux"
    assert cards["sd15-kohya"]["family"] == "sd15"

    cli = [sys.executable, "-m", "server.cli", "loras"]
    piped = subprocess.run(cli, env=cli_env, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    rows = [line.split("\t") for line in piped.stdout.strip().splitlines()]
    assert rows[0] == ["lora", "family", "format", "sha256", "size"]
    assert {row[0]: row[3] for row in rows[1:]} == expected  # whole hashes, every file
    assert rows[1][:3] == ["sd15-kohya", "sd15", "kohya"]
    as_json = subprocess.run(
        [*cli, "--json"], env=cli_env, capture_output=True, text=True, timeout=120
    )
    assert as_json.returncode == 0, as_json.stderr
    listed = json.loads(as_json.stdout)
    assert [
        {"id": r["name"], "object": "lora", **{k: r[k] for k in r if k != "name"}} for r in listed
    ] == body["data"]


def test_an_empty_library_lists_nothing(tmp_path: Path, tiny_models_dir: Path) -> None:
    data = fresh_data_dir(tmp_path, tiny_models_dir)
    with live_server(tiny_settings(data, models=[])) as server, server.client() as client:
        response = client.get("/v1/loras")
    assert response.status_code == 200 and response.json() == {"object": "list", "data": []}
