"""`imagegen batch` killed with SIGKILL at random points and resumed: every row ends up done
exactly once, every image is present once, and the ledger shows no row generated twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from server.batch import MANIFEST_NAME, STATE_NAME, read_manifest
from server.ledger import Ledger
from server.store.sql import open_database

# Enough rows that each kill lands with rows done, rows in flight (--concurrency 8) and rows not
# yet started: the first kill comes after 5 to 30 manifest lines, the second at least 5 lines
# later and by line 50. More rows add only generation time (with 200 the test took 44 s on two
# cores).
ROWS = 60
CLI = [sys.executable, "-c", "from server.cli import main; main()", "batch"]


def complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def start_and_kill(cmd: list[str], env: dict[str, str], manifest: Path, at: int, log: Path) -> int:
    """Run the batch until the manifest has `at` lines, then SIGKILL it. Returns the number
    of lines when it died."""
    with log.open("ab") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        try:
            while complete_lines(manifest) < at and proc.poll() is None:
                assert time.monotonic() < deadline, "the batch made no progress"
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return complete_lines(manifest)


@pytest.mark.slow
def test_killed_twice_then_resumed_runs_every_row_exactly_once(
    tmp_path: Path, cli_env: dict[str, str], data_dir: Path
) -> None:
    seed = int(os.environ.get("BATCH_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    src = tmp_path / "rows.jsonl"
    with src.open("w") as fh:
        for i in range(ROWS):
            row: dict[str, object] = {"prompt": f"kill test {i}", "steps": 1}
            if i % 4:  # every fourth row leaves the seed to the batch (the sidecar path)
                row["seed"] = 10_000 + i
            fh.write(json.dumps(row) + "\n")
    out = tmp_path / "out"
    manifest = out / MANIFEST_NAME
    log = tmp_path / "stderr.log"
    cmd = [*CLI, str(src), "--out", str(out), "--concurrency", "8"]

    first = start_and_kill(cmd, cli_env, manifest, rng.randint(5, 30), log)
    second = start_and_kill([*cmd, "--resume"], cli_env, manifest, rng.randint(first + 5, 50), log)
    final = subprocess.run(
        [*cmd, "--resume"], env=cli_env, capture_output=True, text=True, timeout=180
    )
    context = f"BATCH_KILL_SEED={seed}, killed at {first} and {second} lines"
    assert final.returncode == 0, (context, final.stderr[-2000:])
    assert f"{ROWS} rows: done {ROWS}" in final.stdout, (context, final.stdout)

    # Every row has exactly one complete manifest line, and it says done.
    lines = [json.loads(x) for x in manifest.read_bytes().splitlines()]
    per_row = Counter(line["row"] for line in lines)
    assert sorted(per_row) == list(range(1, ROWS + 1)), context
    assert set(per_row.values()) == {1}, context
    entries = read_manifest(manifest)
    assert all(e.status == "done" for e in entries.values()), context

    # Every image exists once, under the name its manifest line gives.
    names = [name for e in entries.values() for name in e.images]
    assert len(names) == len(set(names)) == ROWS
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == sorted(names)
    assert not list(out.glob(".tmp-*"))

    # From the ledger: no seed was generated twice, and every row's seed was served.
    tag = json.loads((out / STATE_NAME).read_text())["batch_id"]
    db = open_database(None, path=data_dir / "imagegen.sqlite3")
    try:
        rows = Ledger(db).rows(tag=tag, limit=100_000)
    finally:
        db.close()
    generated: Counter[int] = Counter()
    served: set[int] = set()
    for r in rows:
        seeds = json.loads(r["seeds"])
        served.update(seeds)
        if not r["cached"] and r["status"] == "ok":
            generated.update(seeds)
    assert max(generated.values()) == 1, (context, generated.most_common(3))
    manifest_seeds = {s for e in entries.values() for s in e.seeds}
    assert all(isinstance(s, int) for s in manifest_seeds)
    assert manifest_seeds <= served, context
    assert len(manifest_seeds) == ROWS
    # Rows that finished before a kill were never repeated; the rest were regenerated from
    # the cache when they had been generated but not yet recorded.
    assert sum(generated.values()) <= ROWS
