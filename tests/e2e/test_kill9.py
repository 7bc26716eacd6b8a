"""`imagegen generate` killed with SIGKILL again and again on one data directory, each time at
one of the writes a run makes (the tiny model's build, its first cache object, its first output
PNG; the folder is watched for the first new file in it): afterwards every cache entry verifies
and a repeat of its request is a hit with the same bytes, every PNG written is whole, and
nothing temporary stays once stale (tiny-model build folders, cache and output temp files,
files in TMPDIR)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from models.local import tiny
from server.cache import ResultCache
from server.settings import Settings
from server.store.blobs import STALE_TEMP_S, FileBlobs
from server.store.sql import open_database
from tests.helpers_server import fresh_data_dir

IMAGEGEN = [sys.executable, "-m", "server.cli"]
DEADLINE_S = 180
# After the build, one run killed at each kind of write a generate run makes, in the order it
# makes them: at its first cache object (before the entry's index row), then, with another
# seed, at its first output PNG (the entry is stored; the user's files are not). Besides these
# and the build, a run writes only SQLite rows (crash-safe by design) and files in TMPDIR
# (checked below with the rest), so three kills cover each place a kill can leave something
# half-made. Kills at random times did not: a run is a new process (about ten seconds on two
# cores) that loads, generates and writes in half a second some seven seconds in, after its
# imports, so six random kills cost a minute and mostly landed in the imports, where there is
# nothing yet to leave half-made.
TARGETS = (("cache", 1), ("output", 2))
# How often a run's folder is looked at for its first write: every FAST_POLL_S once the run is
# near its writes (the cache's objects are written without an fsync, so a temp file lasts well
# under a millisecond), every SLOW_POLL_S before, through the imports (polling that fast for a
# whole run takes a quarter of a core from it, on two).
FAST_POLL_S = 0.0005
SLOW_POLL_S = 0.05
# Two images a request: two cache objects and two output files per run.
ARGS = ("a lighthouse at dusk", "--size", "64x64", "--steps", "2", "-n", "2")
# Older than either clean-up's rule: what a killed run left looks as it will minutes later.
STALE_S = max(tiny.STALE_BUILD_S, STALE_TEMP_S) + 60


def start(env: dict[str, str], out: Path, seed: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [*IMAGEGEN, "generate", *ARGS, "--seed", str(seed), "--out", str(out), "--json"]
    with log.open("wb") as sink:
        # Its own process group, so the kill reaches anything it started too.
        return subprocess.Popen(
            cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # it finished just before
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(DEADLINE_S)


def result(log: Path) -> dict[str, Any]:
    """The one JSON object a finished run printed (the last line: warnings go first)."""
    data: dict[str, Any] = json.loads(log.read_text().strip().splitlines()[-1])
    return data


def run_to_end(env: dict[str, str], out: Path, seed: int, log: Path) -> dict[str, Any]:
    proc = start(env, out, seed, log)
    assert proc.wait(DEADLINE_S) == 0, log.read_text()[-3000:]
    return result(log)


def files_under(folder: Path) -> set[str]:
    return {os.path.join(root, name) for root, _, names in os.walk(folder) for name in names}


def kill_on_first_write(proc: subprocess.Popen[bytes], folder: Path, fast_after_s: float) -> bool:
    """SIGKILL `proc` as soon as a new file shows in `folder` (or a folder in it): the temp
    file of its first atomic_write there, or that file just renamed into place while the next
    is written; False if the run finished first. Looked at fast from `fast_after_s` on."""
    known = files_under(folder)
    fast_from = time.monotonic() + fast_after_s
    while proc.poll() is None:
        if files_under(folder) - known:
            kill(proc)
            return True
        time.sleep(FAST_POLL_S if time.monotonic() >= fast_from else SLOW_POLL_S)
    return False


def build_folders(data_dir: Path) -> list[Path]:
    prefixes = tuple(f".{name}-" for name in tiny.TINY_MODELS)
    models = data_dir / "models"
    return [p for p in models.iterdir() if p.name.startswith(prefixes)] if models.is_dir() else []


def temp_files(data_dir: Path, out: Path, tmp: Path) -> list[Path]:
    """Everything a killed run may leave that nothing refers to: build folders, atomic_write's
    `.tmp-*` (cache objects, output files), the revision memo's `*.tmpPID`, files in TMPDIR.
    (torch makes an empty torchinductor folder in TMPDIR on every run: folders alone are no
    leak.)"""
    found = build_folders(data_dir)
    found += [p for p in [*data_dir.rglob("*"), *out.rglob("*")] if ".tmp" in p.name]
    found += [p for p in tmp.rglob("*") if not p.is_dir()]
    return found


def backdate(paths: list[Path]) -> None:
    then = time.time() - STALE_S
    for path in paths:
        os.utime(path, (then, then))


def cache_entries(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """key -> its images, read straight from the index (no clean-up runs on this path)."""
    conn = sqlite3.connect(Settings(data_dir=data_dir).db_path)
    try:
        rows = conn.execute("SELECT key, meta FROM cache_entries").fetchall()
    finally:
        conn.close()
    return {key: json.loads(meta)["images"] for key, meta in rows}


def whole_png(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes every row: a truncated file raises
        return image.format == "PNG"


def test_sigkill_mid_write_leaves_a_consistent_data_dir(tmp_path: Path) -> None:
    data_dir = fresh_data_dir(tmp_path)  # no tiny models: the first run builds tiny-sdxl
    out, tmp, logs = tmp_path / "out", tmp_path / "tmp", tmp_path / "logs"
    for folder in (out, tmp, logs):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env.update(IMAGEGEN_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TMPDIR=str(tmp))
    history: list[str] = []
    finished: dict[int, list[str]] = {}  # seed -> the sha256s a run that finished reported

    # The first kill: while the build writes its temporary folder (the pipeline is made in
    # memory first; saving it takes a fraction of a second).
    began = time.monotonic()
    proc = start(env, out, TARGETS[0][1], logs / "build.log")
    while not build_folders(data_dir):
        assert proc.poll() is None, (logs / "build.log").read_text()[-3000:]
        assert time.monotonic() - began < DEADLINE_S, "the build never started"
        time.sleep(0.005)
    kill(proc)
    assert build_folders(data_dir), "the kill came after the build finished"
    # That run's imports and in-memory build took about as long as a later run's imports,
    # load and generation: a later run's first write comes well after half of it (were it
    # sooner, the kill would still land within SLOW_POLL_S of it, among the run's writes).
    fast_after_s = 0.5 * (time.monotonic() - began)
    history.append(f"build: killed after {time.monotonic() - began:.1f}s")

    folders = {"cache": Settings(data_dir=data_dir).cache_dir, "output": out}
    for target, seed in TARGETS:
        log = logs / f"{target}.log"
        began = time.monotonic()
        proc = start(env, out, seed, log)
        if kill_on_first_write(proc, folders[target], fast_after_s):
            took = time.monotonic() - began
            history.append(f"seed {seed}: killed at its first {target} write, {took:.1f}s in")
            continue
        # The write was too quick to catch: a run that was not killed must work, whatever the
        # kills before it left.
        assert proc.wait(DEADLINE_S) == 0, (history, log.read_text()[-3000:])
        finished[seed] = [img["sha256"] for img in result(log)["images"]]
        history.append(f"seed {seed}: finished before its {target} write was seen")

    # Minutes later, as far as the clean-up rules can tell; the next start-up clears it all.
    left = temp_files(data_dir, out, tmp)
    backdate(left)
    before = cache_entries(data_dir)
    hit_seed = next((images[0]["seed"] for images in before.values()), None)
    if hit_seed is None:  # every run was killed before its result was stored
        run_to_end(env, out, TARGETS[0][1], logs / "store.log")
        before, hit_seed = cache_entries(data_dir), TARGETS[0][1]
    history.append(f"left before the last start-up: {sorted(p.name for p in left)}")

    again = run_to_end(env, out, hit_seed, logs / "hit.log")

    (stored,) = [imgs for imgs in before.values() if imgs[0]["seed"] == hit_seed]
    assert again["cached"] is True, history
    assert [img["sha256"] for img in again["images"]] == [img["sha256"] for img in stored]
    assert not temp_files(data_dir, out, tmp), history

    # Every entry verifies: its images are there, hash to what the index says, and decode.
    settings = Settings(data_dir=data_dir)
    cache = ResultCache(
        FileBlobs(settings.cache_dir),
        open_database(None, path=settings.db_path),
        max_bytes=1 << 40,
    )
    for key, images in before.items():
        entry = cache.get(key)  # None for a missing or corrupt image (and it drops the entry)
        assert entry is not None, (key, history)
        assert [img.sha256 for img in entry.images] == [img["sha256"] for img in images]
        assert all(whole_png(img.data) for img in entry.images)
    # A run that finished reported exactly what the cache holds for its request.
    for seed, shas in finished.items():
        assert any([img["sha256"] for img in imgs] == shas for imgs in before.values()), seed

    # No truncated output: every PNG written decodes and hashes to the name it was given.
    pngs = list(out.glob("*.png"))
    assert pngs, history
    for path in pngs:
        data = path.read_bytes()
        assert whole_png(data), path
        assert hashlib.sha256(data).hexdigest().startswith(path.stem.rsplit("-", 1)[1]), path
    print("\n".join(history))
