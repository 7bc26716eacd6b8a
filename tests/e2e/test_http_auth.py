"""API keys: Bearer tokens against stored sha256 digests, enforced on every route (routes added
after the app was built included) except the probes; and the refusal to bind a public address
without keys."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from server import serve_cmd
from server.http.auth import ApiKeys
from server.settings import Settings
from tests.helpers_server import (
    API_KEY,
    LiveServer,
    fresh_data_dir,
    live_server,
    tiny_settings,
)

HASHED_KEY = "second-key-stored-as-digest"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("auth"), tiny_models_dir)
    digest = "sha256:" + hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    with live_server(tiny_settings(data, api_keys=[API_KEY, digest])) as live:
        yield live


def test_probes_need_no_key(server: LiveServer) -> None:
    with server.client() as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/stats", "/metrics", "/v1/jobs/job_x", "/docs", "/openapi.json"]
)
def test_every_other_route_needs_a_key(server: LiveServer, path: str) -> None:
    with server.client() as client:
        missing = client.get(path)
        wrong = client.get(path, headers={"Authorization": "Bearer not-the-key"})
    for response in (missing, wrong):
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "X-Request-Id" in response.headers


def test_generation_needs_a_key(server: LiveServer) -> None:
    body = {"prompt": "a kite", "steps": 2}
    with server.client() as client:
        assert client.post("/v1/images/generations", json=body).status_code == 401
    with server.client(API_KEY) as client:
        assert client.post("/v1/images/generations", json=body).status_code == 200


def test_keys_stored_as_digests_work(server: LiveServer) -> None:
    with server.client(HASHED_KEY) as client:
        assert client.get("/v1/models").status_code == 200
    with server.client("sha256:" + hashlib.sha256(HASHED_KEY.encode()).hexdigest()) as client:
        # The digest itself is not a key.
        assert client.get("/v1/models").status_code == 401


def test_routes_added_later_are_protected(server: LiveServer) -> None:
    async def added_later() -> dict[str, str]:
        return {"secret": "data"}

    server.app.add_api_route("/v1/added-after-start", added_later, methods=["GET"])
    with server.client() as client:
        assert client.get("/v1/added-after-start").status_code == 401
    with server.client(API_KEY) as client:
        response = client.get("/v1/added-after-start")
        assert response.status_code == 200 and response.json() == {"secret": "data"}


def test_api_keys_compare_digests() -> None:
    keys = ApiKeys([SecretStr("alpha"), SecretStr("sha256:" + hashlib.sha256(b"beta").hexdigest())])
    assert keys.enabled
    alpha, beta = keys.match("alpha"), keys.match("beta")
    assert alpha is not None and beta is not None and alpha != beta
    assert keys.match("alph") is None and keys.match("") is None and keys.match("gamma") is None
    assert not ApiKeys([]).enabled


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_binds_need_no_keys(host: str) -> None:
    serve_cmd.check_bind(host, has_keys=False, insecure_no_auth=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "gpu-box.internal"])
def test_public_bind_without_keys_is_refused(host: str) -> None:
    with pytest.raises(serve_cmd.InsecureBindError) as caught:
        serve_cmd.check_bind(host, has_keys=False, insecure_no_auth=False)
    message = caught.value.message
    assert "IMAGEGEN_SERVER__API_KEYS" in message
    assert "[server]" in message and "api_keys" in message
    assert "--insecure-no-auth" in message
    serve_cmd.check_bind(host, has_keys=True, insecure_no_auth=False)
    serve_cmd.check_bind(host, has_keys=False, insecure_no_auth=True)


def test_serve_refuses_before_binding(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(serve_cmd.InsecureBindError):
        serve_cmd.run(settings, models=["tiny-sdxl"], host="0.0.0.0", port=1)


def test_serve_cli_explains_the_refusal(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    env = {"IMAGEGEN_DATA_DIR": str(tmp_path), "IMAGEGEN_SERVER__API_KEYS": "[]"}
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"], env=env)
    assert result.exit_code == 2
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "IMAGEGEN_SERVER__API_KEYS" in output and "--insecure-no-auth" in output
