"""Request input over real HTTP: text UTF-8 cannot encode (a lone surrogate, as a JSON escape or
as raw bytes) is a 400 naming the field on every route that takes a request, and fails only its
own row in a batch; per-request `local_only` is accepted by /v1/images/generations, /v1/jobs and
batch rows, and refuses a hosted model with 403 local_only."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.e2e.test_http_batches import finished
from tests.e2e.test_http_batches import manifest as batch_manifest
from tests.helpers_server import LiveServer, fresh_data_dir, live_server, tiny_settings

HOSTED = {"name": "test-hosted", "kind": "openai", "source": "openai", "provider_model": "dall-e-3"}
JSON = {"content-type": "application/json"}
GOOD = {"prompt": "a quiet harbour", "seed": 5, "steps": 1, "size": "64x64"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[LiveServer]:
    # A hosted model in the catalogue and no provider key: nothing here may reach a network.
    data = fresh_data_dir(tmp_path_factory.mktemp("input"), tiny_models_dir)
    with live_server(tiny_settings(data, top={"models": [HOSTED]})) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def refused(response: httpx.Response, status: int, code: str, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == "invalid_request_error"
    return str(error["message"])


def manifest(client: httpx.Client, batch_id: str) -> dict[int, dict[str, Any]]:
    return {line["row"]: line for line in batch_manifest(client, batch_id)}


# -- text UTF-8 cannot encode ------------------------------------------------------------------

SURROGATE_BODIES = [
    pytest.param(b'{"prompt": "\\ud800"}', "prompt", id="json-escape"),
    pytest.param(b'{"prompt": "\xed\xa0\x80"}', "prompt", id="raw-bytes"),
    pytest.param(b'{"prompt": "ok", "user": "\\udfff"}', "user", id="user-field"),
    pytest.param(b'{"prompt": "ok", "negative_prompt": "a\\udc00b"}', "negative_prompt", id="neg"),
]


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
@pytest.mark.parametrize(("body", "param"), SURROGATE_BODIES)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    client: httpx.Client, path: str, body: bytes, param: str
) -> None:
    message = refused(client.post(path, content=body, headers=JSON), 400, "invalid_request", param)
    assert "lone surrogate" in message


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
def test_a_lone_surrogate_in_a_field_name_is_a_400(client: httpx.Client, path: str) -> None:
    response = client.post(path, content=b'{"prompt": "ok", "\\udfff": 1}', headers=JSON)
    refused(response, 400, "invalid_request", None)


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
def test_a_body_that_is_not_utf8_is_a_400_saying_so(client: httpx.Client, path: str) -> None:
    response = client.post(path, content=b'{"prompt": "\xff"}', headers=JSON)
    message = refused(response, 400, "invalid_request", None)
    assert "JSON (UTF-8)" in message


def test_a_lone_surrogate_fails_only_its_batch_row(client: httpx.Client) -> None:
    upload = b'{"prompt": "\\ud800"}\n' + json.dumps(GOOD).encode() + b"\n"
    created = client.post("/v1/batches", files={"file": ("rows.jsonl", upload)})
    assert created.status_code == 202, created.text
    [invalid] = created.json()["invalid_rows"]
    assert (invalid["row"], invalid["line"], invalid["param"]) == (1, 1, "prompt")
    assert "lone surrogate" in invalid["message"]
    batch_id = created.json()["id"]
    final = finished(client, batch_id)
    assert (final["done"], final["failed"]) == (1, 1)
    lines = manifest(client, batch_id)
    assert lines[1]["status"] == "failed" and lines[1]["param"] == "prompt"
    assert lines[2]["status"] == "done"

    # The same in an inline list: the row fails, not the whole body.
    inline = b'{"requests": [{"prompt": "\\ud800"}, ' + json.dumps(GOOD).encode() + b"]}"
    created = client.post("/v1/batches", content=inline, headers=JSON)
    assert created.status_code == 202, created.text
    assert [p["param"] for p in created.json()["invalid_rows"]] == ["prompt"]
    assert finished(client, created.json()["id"])["done"] == 1


def test_an_upload_that_is_not_utf8_is_a_400_naming_the_file(client: httpx.Client) -> None:
    upload = b'{"prompt": "\xed\xa0\x80"}\n'
    response = client.post("/v1/batches", files={"file": ("rows.jsonl", upload)})
    message = refused(response, 400, "invalid_request", "file")
    assert message.startswith("file must be UTF-8 text")


# -- per-request local_only --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
def test_local_only_refuses_a_hosted_model_with_403(client: httpx.Client, path: str) -> None:
    body = {"prompt": "a boat", "model": "test-hosted", "local_only": True}
    message = refused(client.post(path, json=body), 403, "local_only", "model")
    assert "local-only" in message


def test_local_only_false_keeps_the_hosted_behaviour(client: httpx.Client) -> None:
    body = {"prompt": "a boat", "model": "test-hosted", "local_only": False}
    # No provider key is configured: the provider is tried and refuses, as without the field.
    for sent in (body, {k: v for k, v in body.items() if k != "local_only"}):
        response = client.post("/v1/images/generations", json=sent)
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == "provider_auth_failed"


def test_local_only_still_serves_a_local_model(client: httpx.Client) -> None:
    response = client.post("/v1/images/generations", json={**GOOD, "local_only": True})
    assert response.status_code == 200, response.text
    assert response.json()["imagegen"]["provider"] == "local"


def test_local_only_is_json_strict(client: httpx.Client) -> None:
    response = client.post("/v1/images/generations", json={**GOOD, "local_only": "yes"})
    refused(response, 400, "invalid_request", "local_only")


def test_local_only_in_batch_rows(client: httpx.Client) -> None:
    upload = (
        b"prompt,model,local_only,steps,size,seed\n"
        b"a boat,test-hosted,true,,,\n"
        b"a quiet harbour,,true,1,64x64,5\n"
    )
    created = client.post("/v1/batches", files={"file": ("rows.csv", upload)})
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    assert finished(client, batch_id)["done"] == 1
    lines = manifest(client, batch_id)
    assert lines[1]["status"] == "failed" and lines[1]["param"] == "model"
    assert "local-only" in lines[1]["error"]
    assert lines[2]["status"] == "done" and lines[2]["provider"] == "local"
