"""`imagegen` as a user runs it: real files, exit codes, one-line errors. Most tests run the
CLI in this process (tests/helpers_cli.py: the same `main()`, no torch import per run); a real
process where only one shows it: the `python -m server.cli` entry point, SIGKILL mid-run, the
offline switch read at import, click's own usage errors, stdout kept to one JSON object."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers_cli import IMAGEGEN, imagegen, imagegen_process

Run = Callable[..., subprocess.CompletedProcess[str]]


def generate_json(
    env: dict[str, str], out: Path, *args: str, run: Run = imagegen
) -> dict[str, Any]:
    proc = run(env, "generate", *args, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON object on stdout
    data: dict[str, Any] = json.loads(lines[0])
    return data


def test_generate_json_writes_pngs_then_hits_cache(cli_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = generate_json(
        cli_env, out, "a red fox", "--seed", "7", "-n", "2", "--size", "64x48", "--steps", "2"
    )
    assert {
        k
        for k in (
            "request_id",
            "model",
            "provider",
            "cached",
            "cost_usd",
            "gpu_seconds",
            "revised_prompt",
            "dropped_params",
            "images",
        )
    } <= first.keys()
    assert [i["seed"] for i in first["images"]] == [7, 8]
    for item in first["images"]:
        with Image.open(item["path"]) as img:
            assert img.format == "PNG" and img.size == (64, 48)
        assert (item["width"], item["height"]) == (64, 48)
    second = generate_json(
        cli_env, out, "a red fox", "--seed", "7", "-n", "2", "--size", "64x48", "--steps", "2"
    )
    assert second["cached"] is True and second["cost_usd"] == 0
    assert [i["sha256"] for i in second["images"]] == [i["sha256"] for i in first["images"]]

    stats = imagegen(cli_env, "stats", "--json")
    assert stats.returncode == 0
    data = json.loads(stats.stdout)
    assert data["requests"] == 2 and data["cached"] == 1
    assert data["cost_usd"] == pytest.approx(first["cost_usd"])

    # Piped (stdout is not a terminal): plain rows with every value whole, one per model.
    plain = imagegen(cli_env, "stats")
    assert plain.returncode == 0, plain.stderr
    header, *rows = plain.stdout.strip().splitlines()[1:]
    assert header.split("\t")[:3] == ["model", "provider", "requests"]
    assert [row.split("\t")[:3] for row in rows] == [["tiny-sdxl", "local", "2"]]


def test_tiny_flux_from_the_cli(cli_env: dict[str, str], tmp_path: Path) -> None:
    res = generate_json(
        cli_env,
        tmp_path,
        "a comet",
        "--model",
        "tiny-flux",
        "--seed",
        "1",
        "--size",
        "80x64",
        "--steps",
        "2",
    )
    with Image.open(res["images"][0]["path"]) as img:
        assert img.size == (80, 64)


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["generate", "a boat", "--size", "64by64"], 2, "size must be WIDTHxHEIGHT"),
        (["generate", "a boat", "--size", "70x64"], 2, "multiple of 8"),
        (["generate", "a n.u.d.e boat"], 2, "content policy"),
        (["generate", "a boat", "--model", "nope"], 2, "model 'nope' is not in the catalogue"),
        (["generate", "a boat", "--scheduler", "warp"], 2, "scheduler 'warp'"),
        (["generate", "a boat", "--model", "sdxl"], 1, "huggingface-cli download"),
        (["generate"], 2, "PROMPT is missing"),
        (["generate", "a boat", "--config", "/no/such.toml"], 2, "--config: no such file"),
    ],
)
def test_errors_are_one_line_with_exit_codes(
    cli_env: dict[str, str], tmp_path: Path, args: list[str], code: int, needle: str
) -> None:
    proc = imagegen(cli_env, *args, "--out", str(tmp_path)) if args[0] == "generate" else None
    assert proc is not None
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("imagegen: error:")
    assert not list(tmp_path.glob("*.png"))


def test_blocked_prompt_exits_before_any_model_is_built(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    env = {**cli_env, "IMAGEGEN_DATA_DIR": str(tmp_path / "fresh")}
    proc = imagegen(env, "generate", "n u d e", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert not (tmp_path / "fresh" / "models").exists()


def test_config_file_and_models_listing(cli_env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "imagegen.toml"
    cfg.write_text(
        'default_model = "tiny-flux"\n'
        "[[models]]\n"
        'name = "my-sdxl"\nkind = "sdxl"\nsource = "/weights/missing.safetensors"\n'
    )
    listing = imagegen(cli_env, "models", "--json", "--config", str(cfg))
    assert listing.returncode == 0, listing.stderr
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["tiny-sdxl"]["available"] and rows["tiny-sdxl"]["builtin"]
    assert rows["my-sdxl"]["available"] is False
    res = generate_json(cli_env, tmp_path, "a comet", "--config", str(cfg), "--steps", "1")
    assert res["model"] == "tiny-flux"


def test_kill_mid_run_leaves_nothing_a_later_run_would_serve(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL at several points of a run; every later run either misses or serves verified
    bytes, and no partial image file is left in the output folder. Real processes: the
    killed runs, and the later run that meets what they left (it is also this module's one
    whole `generate --json` through the entry point: one JSON object on the process's stdout,
    whatever the libraries print); the clean reference runs in this process."""
    out = tmp_path / "out"
    args = [*IMAGEGEN, "generate", "a tower", "--seed", "3", "--steps", "2", "--out", str(out)]
    for delay in (0.8, 1.6, 2.4):
        proc = subprocess.Popen(
            args, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = generate_json(
        cli_env, out, "a tower", "--seed", "3", "--steps", "2", run=imagegen_process
    )
    clean = generate_json(cli_env, tmp_path / "clean", "a tower", "--seed", "3", "--steps", "2")
    assert final["images"][0]["sha256"] == clean["images"][0]["sha256"]
    for png in out.glob("*.png"):
        Image.open(png).verify()


def test_pull_while_offline_fails_at_once_with_what_to_do(cli_env: dict[str, str]) -> None:
    # "At once": the command checks the setting before it tries the hub (the message names
    # it), rather than retrying a download; the run's deadline stops a hang. A real process:
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported, and these are exit statuses as
    # the OS reports them (1, then 2).
    proc = imagegen_process(cli_env, "pull", "sdxl")
    assert proc.returncode == 1
    assert "HF_HUB_OFFLINE is set" in proc.stderr and "Traceback" not in proc.stderr
    assert imagegen_process(cli_env, "pull", "tiny-sdxl").returncode == 2


def test_listings_piped_print_whole_values(cli_env: dict[str, str]) -> None:
    """`imagegen models | grep ...` must see whole names: a rich table on a pipe cut them to
    80 columns ('stability-sd…')."""
    listing = imagegen(cli_env, "models")
    assert listing.returncode == 0, listing.stderr
    rows = [line.split("\t") for line in listing.stdout.strip().splitlines()]
    assert rows[0] == ["model", "kind", "provider", "available", "on disk", "source"]
    names = {row[0] for row in rows[1:]}
    as_json = {row["name"] for row in json.loads(imagegen(cli_env, "models", "--json").stdout)}
    assert names == as_json and "stability-sd3.5-large-turbo" in names
    assert all(len(row) == 6 for row in rows)
    # Client aliases are listed with what they map to (no OpenAI key here).
    by_name = {row[0]: row for row in rows[1:]}
    assert by_name["dall-e-2"][5] == by_name["dall-e-3"][5] == "alias of tiny-sdxl"
    presets = imagegen(cli_env, "presets").stdout.strip().splitlines()
    assert presets[0].split("\t") == ["preset", "template", "negative prompt"]
    assert any(line.startswith("product-photo\t") for line in presets)


def test_help_shows_flags_as_flags(cli_env: dict[str, str]) -> None:
    # A real process (cheap: --help imports no torch): the help as the entry point prints it.
    text = imagegen_process(cli_env, "generate", "--help").stdout
    assert "--json" in text and "--local-only" in text
    assert "<bool>" not in text
    assert "--steps <int>" in text  # options that take a value still say what


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "a boat", "--sizee", "64x64"], "No such option: --sizee"),
        (["frobnicate"], "No such command"),
        (["generate", "a boat", "-n", "two"], "'-n'"),
    ],
)
def test_usage_errors_are_one_line_too(
    cli_env: dict[str, str], args: list[str], needle: str
) -> None:
    # A real process (cheap: click refuses these before a command imports torch): click's own
    # errors, and nothing else on the process's stderr.
    proc = imagegen_process(cli_env, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagegen: error:") and needle in lines[0]


def test_written_images_are_readable_by_others(cli_env: dict[str, str], tmp_path: Path) -> None:
    res = generate_json(cli_env, tmp_path, "a comet", "--seed", "1", "--steps", "1")
    assert Path(res["images"][0]["path"]).stat().st_mode & 0o044 == 0o044
