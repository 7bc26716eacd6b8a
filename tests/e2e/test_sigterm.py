"""`imagegen serve` stopped with SIGTERM under load, as a supervisor stops it: the work in
flight finishes (a generation answers 200, a job's event stream delivers `completed`), new work
is refused, the process exits 0 within the grace period and leaves no temporary files."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from server.serve_cmd import GRACEFUL_SHUTDOWN_S
from tests.cluster import attach
from tests.helpers_server import fresh_data_dir

DEADLINE_S = 90
# Many steps at a small size: seconds of device work on the tiny model, so the signal lands
# while the job runs (the test waits for its progress events before sending it).
SLOW = {"size": "64x64", "steps": 80}


def start_serve(data_dir: Path, tmp: Path) -> tuple[subprocess.Popen[str], str, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    # One compute thread: on a busy 2-core box the job must still end within the drain's grace.
    env.update(
        IMAGEGEN_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TMPDIR=str(tmp), OMP_NUM_THREADS="1"
    )
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "-m", "tiny-sdxl"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    replica = attach(proc)
    return proc, replica.url, replica.log


def wait_ready(client: httpx.Client) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.1)


def read_events(client: httpx.Client, job_id: str, into: list[tuple[str, Any]]) -> None:
    kind = ""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                into.append((kind, json.loads(line.removeprefix("data: "))))


def is_png(b64: str) -> bool:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        image.verify()
        return image.format == "PNG"


def test_sigterm_lets_work_in_flight_finish_then_exits_0(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    data_dir = fresh_data_dir(tmp_path, tiny_models_dir)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, url, log = start_serve(data_dir, tmp)
    try:
        with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
            wait_ready(client)
            job = client.post("/v1/jobs", json={"prompt": "a slow job", "seed": 1, **SLOW})
            assert job.status_code == 202
            events: list[tuple[str, Any]] = []
            reader = threading.Thread(target=read_events, args=(client, job.json()["id"], events))
            reader.start()
            answers: list[httpx.Response] = []
            body = {"prompt": "a slow request", "seed": 2, **SLOW}
            poster = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(url + "/v1/images/generations", json=body, timeout=DEADLINE_S)
                )
            )
            poster.start()
            deadline = time.monotonic() + DEADLINE_S
            while not any(kind == "progress" for kind, _ in events):
                assert time.monotonic() < deadline and reader.is_alive(), events
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            # New work is refused while the drain runs: a 503, or no connection at all.
            try:
                late = httpx.post(url + "/v1/images/generations", json=body, timeout=10)
                assert late.status_code == 503, late.text
            except httpx.TransportError:
                pass
            reader.join(DEADLINE_S)
            poster.join(DEADLINE_S)
        code = proc.wait(GRACEFUL_SHUTDOWN_S + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kind, last = events[-1]
    assert kind == "completed", (events[-3:], "".join(log[-20:]))
    assert all(is_png(item["b64_json"]) for item in last["result"]["data"])
    (answer,) = answers
    assert answer.status_code == 200 and is_png(answer.json()["data"][0]["b64_json"])
    assert code == 0, "".join(log[-20:])
    left = [p for p in data_dir.rglob("*") if p.name.startswith((".tmp", ".tiny-"))]
    assert not left, left
    assert not list(tmp.iterdir())
