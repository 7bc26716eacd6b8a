"""Fuzzing over real HTTP: schemathesis drives every operation of the live OpenAPI of a tiny
server (schema-valid and schema-breaking data, with and without API keys) and expects no 5xx
and no response that breaks the documented schema; hypothesis sends any Unicode (surrogates,
NULs, up to 100 KB) in every text field of a generation request and expects 200 or a 4xx."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.helpers_server import LiveServer, fresh_data_dir, live_server, tiny_settings

KEY = "k-fuzz-0123456789"
# Few examples per operation: the aim is every operation under both kinds of data within the
# file's ~90 s on two cores, not depth (the bad-input table covers the known edges).
EXAMPLES_PER_OPERATION = 8


@pytest.fixture(scope="module")
def open_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("fuzz-open"), tiny_models_dir)
    with live_server(tiny_settings(data)) as live:
        yield live


@pytest.fixture(scope="module")
def keyed_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[LiveServer]:
    data = fresh_data_dir(tmp_path_factory.mktemp("fuzz-keyed"), tiny_models_dir)
    # Negative cases send wrong keys by the hundred from one address: the failed-auth lockout
    # (tests/e2e/test_quotas.py pins it) would answer all the rest 429, fuzzing nothing.
    settings = tiny_settings(data, api_keys=[KEY], auth_failures_per_minute=1_000_000)
    with live_server(settings) as live:
        yield live


def _schema(live: LiveServer, headers: dict[str, str]) -> Any:
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", headers=headers)


def _bounded(case: Any) -> None:
    """Keep a schema-valid generation small: any size, step count or image count the schema
    allows is valid, but a 4096x4096, 200-step, 10-image request would take minutes on CPU.
    Only the values that cost device time are pinned; every other field stays as fuzzed."""
    body = case.body
    if not isinstance(body, dict):
        return
    pins = {"steps": 1, "n": 1, "batch_size": 1, "n_iter": 1, "width": 64, "height": 64}
    for name, value in pins.items():
        if isinstance(body.get(name), int) and not isinstance(body.get(name), bool):
            body[name] = value
    if isinstance(body.get("size"), str) and "x" in body["size"]:
        body["size"] = "64x64"


def _fuzz(live: LiveServer, mode: str, headers: Any, key: str | None = None) -> list[str]:
    """Every operation of the live schema, EXAMPLES_PER_OPERATION cases each in `mode`; what
    broke, one line per operation. (schemathesis's own pytest plugin does not run under this
    pytest: it reads Function._nodeid, gone in pytest 9, so the cases are drawn here.)"""
    broken: list[str] = []
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    for result in _schema(live, auth).get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            _bounded(case)
            sent = headers(case)
            response = case.call(base_url=live.url, headers=sent, timeout=60)
            assert response.status_code < 500, (
                f"{response.status_code}: {response.text[:300]} for {case.body!r:.300}"
            )
            case.validate_response(response, checks=[response_schema_conformance])

        try:
            run()
        except Unsatisfiable:
            continue  # an operation with no parameters and no body has nothing to break
        except Exception as exc:
            broken.append(f"{operation.label}: {str(exc)[:600]}")
    return broken


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_open_server_has_no_5xx_and_keeps_its_schema(open_server: LiveServer, mode: str) -> None:
    broken = _fuzz(open_server, mode, lambda case: {})
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_keyed_server_has_no_5xx_and_keeps_its_schema(keyed_server: LiveServer, mode: str) -> None:
    # Every other case without a key (each must be a 401, never a 5xx), the rest with it.
    turn = iter(range(10**9))
    with_key = {"Authorization": f"Bearer {KEY}"}
    broken = _fuzz(keyed_server, mode, lambda case: with_key if next(turn) % 2 else {}, KEY)
    assert not broken, "\n".join(broken)


# -- every text field of a generation request ----------------------------------------------

TEXT_FIELDS = (
    "prompt",
    "negative_prompt",
    "user",
    "model",
    "scheduler",
    "preset",
    "style",
    "quality",
)
# Any code point, lone surrogates included (json.dumps writes them as \\ud800 escapes), NULs,
# and now and then a long run (100 KB) of one character.
ANY_TEXT = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=200),
    st.builds(lambda c: c * 100_000, st.characters(codec=None, exclude_categories=())),
    st.just("\x00"),
    # Surrogates and control characters alone, so 25 examples meet them more than by chance.
    st.text(st.characters(categories=["Cs", "Cc"]), min_size=1, max_size=20),
)


@pytest.fixture(scope="module")
def client(open_server: LiveServer) -> Iterator[httpx.Client]:
    with open_server.client() as client:
        yield client


@given(field=st.sampled_from(TEXT_FIELDS), text=ANY_TEXT)
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_text_in_any_text_field_is_a_200_or_a_4xx(
    client: httpx.Client, field: str, text: str
) -> None:
    body = {"prompt": "a quiet harbour", "steps": 1, "size": "64x64", "seed": 1, field: text}
    raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate goes as its escape
    response = client.post(
        "/v1/images/generations", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text[:500]
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
