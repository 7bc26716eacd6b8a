"""`providers.<id>` settings: typed and validated when the settings are built, so a bad value
stops `imagegen serve` before it binds, naming the setting, instead of failing a client later."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from models.hosted.config import ProviderConfig
from server.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A port something already listens on: a server that got as far as binding it would
    fail with 'address already in use', not with a settings error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def serve(tmp_path: Path, config: str, port: int, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "bad.toml").write_text(config, encoding="utf-8")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    clean |= {"IMAGEGEN_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", **env}
    args = ["serve", "--config", str(tmp_path / "bad.toml"), "--host", "127.0.0.1"]
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args, "--port", str(port), "--model", "tiny-sdxl"],
        env=clean,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_with_a_bad_provider_value_fails_before_binding(
    tmp_path: Path, occupied_port: int
) -> None:
    proc = serve(tmp_path, "[providers.openai]\napi_key = 'sk-x'\ntimeout_s = 0\n", occupied_port)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("imagegen: error: settings: providers.openai.timeout_s:")
    assert "greater than 0" in line
    assert "address already in use" not in proc.stderr.lower()
    assert "sk-x" not in proc.stderr


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ("[providers.opneai]\napi_key = 'k'\n", "providers.opneai is not a hosted provider"),
        ("[providers.bfl]\nretry_cap = 3\n", "providers.bfl.retry_cap is not a setting"),
        ("[providers.midjourney]\napi_key = 'k'\n", "providers.midjourney.base_url:"),
        # A typo in a section is an error, not silently ignored (`api_key` would leave the
        # server without keys).
        ("[server]\napi_key = 'k'\n", "server.api_key is not a setting"),
        ("[local]\nmax_batch = 2\n", "local.max_batch is not a setting"),
        ("[server]\napi_keys = [{key = 'k', nmae = 'ci'}]\n", "server.api_keys.0.nmae is not"),
        (
            "[server]\napi_keys = [{key = 'a', name = 'ci'}, {key = 'b', name = 'ci'}]\n",
            "the name 'ci' is given to two keys",
        ),
    ],
)
def test_serve_names_an_unknown_provider_or_setting(
    tmp_path: Path, occupied_port: int, config: str, named: str
) -> None:
    proc = serve(tmp_path, config, occupied_port)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert named in line


def test_every_bad_value_is_named_one_line_each(tmp_path: Path, occupied_port: int) -> None:
    config = (
        "[providers.openai]\ntimeout_s = 0\nmax_retries = 'many'\n[local]\nmax_batch_size = 0\n"
    )
    proc = serve(tmp_path, config, occupied_port)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith("imagegen: error: settings: ") for line in lines)
    named = " ".join(lines)
    for setting in (
        "providers.openai.timeout_s",
        "providers.openai.max_retries",
        "local.max_batch_size",
    ):
        assert setting in named


def test_a_bad_value_from_the_environment_is_named_too(tmp_path: Path, occupied_port: int) -> None:
    proc = serve(tmp_path, "", occupied_port, IMAGEGEN_PROVIDERS__BFL__POLL_TIMEOUT_S="soon")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "providers.bfl.poll_timeout_s: Input should be a valid number" in line


def test_the_key_from_the_environment_joins_the_file_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "imagegen.toml"
    config.write_text("[providers.openai]\ntimeout_s = 12\n", encoding="utf-8")
    monkeypatch.setenv("IMAGEGEN_PROVIDERS__OPENAI__API_KEY", "sk-from-env")
    monkeypatch.setenv("IMAGEGEN_PROVIDERS__STABILITY__API_KEY", "sk-stability")
    settings = load_settings(config, data_dir=tmp_path)
    openai = settings.providers["openai"]
    assert (openai.api_key_value(), openai.timeout_s) == ("sk-from-env", 12.0)
    assert openai.base_url == "https://api.openai.com"
    assert settings.providers["stability"].api_key_value() == "sk-stability"
    assert "sk-from-env" not in repr(settings)


def test_settings_and_from_mapping_are_one_validation() -> None:
    raw = {"api_key": " k ", "base_url": "http://gpu-box:8000/", "max_retries": "2"}
    settings = Settings(providers={"imagegen": raw})
    assert settings.providers["imagegen"] == ProviderConfig.from_mapping("imagegen", raw)
    assert settings.providers["imagegen"].base_url == "http://gpu-box:8000"
    assert settings.providers["imagegen"].max_retries == 2


def test_a_hosted_source_of_the_users_catalogue_is_a_provider_id() -> None:
    # A second imagegen server, reached through the user's own [[models]] entry.
    models = [{"name": "gpu2-sdxl", "kind": "imagegen", "source": "gpu2", "provider_model": "sdxl"}]
    settings = Settings(models=models, providers={"gpu2": {"base_url": "http://gpu2:8000"}})
    assert settings.providers["gpu2"].provider == "gpu2"
    with pytest.raises(ValidationError, match=r"providers\.gpu2 is not a hosted provider"):
        Settings(providers={"gpu2": {"base_url": "http://gpu2:8000"}})
