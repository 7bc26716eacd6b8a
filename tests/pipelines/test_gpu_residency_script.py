"""scripts/gpu_residency.py, the residency check a GPU machine runs with full-size models, as
its dry run on the tiny models on the CPU: the same steps end to end (so the script a device
session gets cannot have rotted), one JSON object, every switch an eviction and a load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_residency.py"


def test_the_dry_run_switches_models_and_prints_one_json_object(data_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(data_dir)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--huge", "4", "--steps", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["device"] == "cpu"
    assert [s["model"] for s in report["switches"]] == ["tiny-sdxl", "tiny-flux"] * 2 + [
        "tiny-sdxl"
    ]
    # Room for one model and a half: every switch evicts the other (on the CPU, off), then
    # loads this one.
    kinds = [move["kind"] for move in report["moves"]]
    assert kinds == ["load"] + ["drop", "load"] * 4
    assert report["forced_out_of_memory"]["images"] == 4
