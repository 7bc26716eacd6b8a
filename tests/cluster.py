"""Several real `imagegen serve` processes on loopback sharing one store (a PostgreSQL
database and an S3 prefix): each with its own data directory (the tiny models copied in),
started together so that their imports overlap."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.helpers_server import metric_value
from tests.s3 import BUCKET, CREDENTIALS

START_TIMEOUT_S = 180.0


@dataclass
class Replica:
    proc: subprocess.Popen[str]
    url: str
    log: list[str] = field(default_factory=list)
    # The key its clients send (None where the cluster runs without keys).
    api_key: str | None = None

    def client(self, api_key: str | None = None) -> httpx.Client:
        key = api_key or self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, timeout=120.0, headers=headers)

    def generated_images(self) -> float:
        """Images this process's device generated (pipeline calls' images): the backend's
        own count, cache hits excluded."""
        with self.client() as client:
            text = client.get("/metrics").text
        return metric_value(text, "imagegen_batch_size_images_sum")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


def store_env(store_url: str, s3_endpoint: str, prefix: str) -> dict[str, str]:
    """The settings, as environment variables, that put a process on the shared store."""
    return {
        "IMAGEGEN_STORE__URL": store_url,
        "IMAGEGEN_BLOBS__URL": f"s3://{BUCKET}/{prefix}",
        "IMAGEGEN_BLOBS__ENDPOINT_URL": s3_endpoint,
        "IMAGEGEN_BLOBS__REGION": CREDENTIALS["region"],
        "IMAGEGEN_BLOBS__ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "IMAGEGEN_BLOBS__SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
    }


def _start(data_dir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    # One compute thread each: several processes share this machine's cores.
    full.update(env, IMAGEGEN_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "-m", "tiny-sdxl"]
    return subprocess.Popen(cmd, env=full, stderr=subprocess.PIPE, text=True)


def attach(proc: subprocess.Popen[str]) -> Replica:
    """The replica once its `imagegen serve` process says where it listens; its stderr is
    kept in `log` from then on."""
    assert proc.stderr is not None
    log: list[str] = []
    for line in proc.stderr:  # uvicorn names the port it bound
        log.append(line)
        found = re.search(r"running on (http://\S+)", line)
        if found:
            break
    else:
        raise AssertionError("imagegen serve did not start:\n" + "".join(log))
    stderr = proc.stderr
    threading.Thread(target=lambda: log.extend(stderr), daemon=True).start()
    return Replica(proc, found.group(1), log)


@contextmanager
def replicas(
    count: int, root: Path, tiny_models_dir: Path, env: dict[str, str], api_key: str | None = None
) -> Iterator[list[Replica]]:
    procs = []
    try:
        for index in range(count):
            data_dir = root / f"replica-{index}"
            shutil.copytree(tiny_models_dir / "models", data_dir / "models")
            procs.append(_start(data_dir, env))
        running = [attach(proc) for proc in procs]
        for replica in running:
            replica.api_key = api_key
            _wait_ready(replica)
        yield running
    finally:
        # Killed, not drained: nothing of these tests waits on a graceful stop, and six
        # drains in turn would cost seconds each.
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait(timeout=30)


def _wait_ready(replica: Replica) -> None:
    import time

    deadline = time.monotonic() + START_TIMEOUT_S
    with replica.client() as client:
        while client.get("/readyz").status_code != 200:
            assert replica.proc.poll() is None, "".join(replica.log)
            assert time.monotonic() < deadline, "never ready:\n" + "".join(replica.log)
            time.sleep(0.1)
