"""Exposing the server: security headers on every response (JSON, errors, A1111), a strict CSP
on HTML, CORS off unless origins are listed, and the wildcard-with-credentials refusal."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from server.settings import Settings
from tests.helpers_server import API_KEY, LiveServer, fresh_data_dir, live_server, tiny_settings

ALLOWED = "https://app.example.com"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("security"), tiny_models_dir)
    with live_server(tiny_settings(data, api_keys=[API_KEY], cors_origins=[ALLOWED])) as live:
        yield live


def _assert_hardened(headers: httpx.Headers) -> None:
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    ("path", "key", "status"),
    [
        ("/v1/models", API_KEY, 200),  # JSON
        ("/v1/models", "wrong-key", 401),  # an error from the key check
        ("/v1/jobs/job_missing", API_KEY, 404),  # an error from a route
        ("/sdapi/v1/sd-models", API_KEY, 200),  # A1111
        ("/sdapi/v1/sd-models", "wrong-key", 401),  # A1111's own error shape
        ("/livez", None, 200),  # a public probe
    ],
)
def test_every_response_carries_the_headers(
    server: LiveServer, path: str, key: str | None, status: int
) -> None:
    with server.client(key) as client:
        response = client.get(path)
    assert response.status_code == status
    _assert_hardened(response.headers)
    assert "content-security-policy" not in response.headers  # JSON: no page to police


def test_html_gets_a_csp_and_docs_only_its_cdn(server: LiveServer) -> None:
    with server.client(API_KEY) as client:
        docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    _assert_hardened(docs.headers)
    csp = docs.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    # The page's assets come from where FastAPI points them: the CDN is allowed, nothing else.
    assert "https://cdn.jsdelivr.net" in docs.text and "https://cdn.jsdelivr.net" in csp


def test_cors_preflight_only_for_listed_origins(server: LiveServer) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with server.client() as client:
        allowed = client.options("/v1/images/generations", headers={"Origin": ALLOWED, **preflight})
        other = client.options(
            "/v1/images/generations", headers={"Origin": "https://evil.example", **preflight}
        )
        simple = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    _assert_hardened(allowed.headers)
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in simple.headers


def test_cors_off_by_default(tmp_path: Path) -> None:
    data = fresh_data_dir(tmp_path)
    settings = tiny_settings(data, api_keys=[API_KEY], models=[])
    with live_server(settings) as live, live.client(API_KEY) as client:
        response = client.get("/v1/models", headers={"Origin": ALLOWED})
        preflight = client.options(
            "/v1/models", headers={"Origin": ALLOWED, "Access-Control-Request-Method": "GET"}
        )
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in preflight.headers


def test_wildcard_with_credentials_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(data_dir=tmp_path, server={"cors_origins": ["*"], "cors_allow_credentials": True})
    text = str(info.value)
    assert "server.cors_origins" in text and "cors_allow_credentials = false" in text
    # Each alone is fine.
    Settings(data_dir=tmp_path, server={"cors_origins": ["*"]})
    Settings(data_dir=tmp_path, server={"cors_origins": [ALLOWED], "cors_allow_credentials": True})
