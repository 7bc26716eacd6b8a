"""The service around hosted providers (real stubs on loopback): what a provider billed before
refusing is booked under the request's own id; the provider's revised prompt reaches the
result; a daily budget stops the first request to a token-billed model; and a job for a hosted
model reports queued -> running -> succeeded like a local one, answering 202 before the
provider does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server import errors
from server.service import ImageRequest, ImageService
from server.settings import Settings
from tests.helpers_server import fresh_data_dir, live_server, tiny_settings
from tests.stubs.common import delay, require_specs, variant
from tests.stubs.fixtures import FAST, live
from tests.stubs.openai_stub import OpenAIStub
from tests.stubs.stability_stub import StabilityStub

KEY = "k-stability"


@pytest.fixture(scope="module")
def stability() -> Iterator[StabilityStub]:
    with live(StabilityStub(api_key=KEY)) as stub:
        yield stub


@pytest.fixture(autouse=True)
def clean(stability: StabilityStub) -> Iterator[None]:
    stability.state.reset()
    yield
    assert stability.state.invalid == [], "a request broke the Stability wire contract"


OPENAI_KEY = "k-openai"


@pytest.fixture(scope="module")
def openai() -> Iterator[OpenAIStub]:
    require_specs()  # the stub checks every request against OpenAI's published schema
    with live(OpenAIStub(api_key=OPENAI_KEY)) as stub:
        yield stub


def openai_service(data_dir: Path, stub: OpenAIStub, **settings: Any) -> ImageService:
    config = {"openai": {"base_url": stub.url, "api_key": OPENAI_KEY, **FAST}}
    return ImageService(Settings(data_dir=data_dir, providers=config, **settings))


def test_the_providers_revised_prompt_reaches_the_result(
    data_dir: Path, openai: OpenAIStub
) -> None:
    openai.state.reset()
    openai.state.script("generate", variant("revised"))
    service = openai_service(data_dir, openai)
    try:
        request = ImageRequest(prompt="a red fox", model="gpt-image-2", width=1024, height=1024)
        result = asyncio.run(service.generate(request))
        assert result.revised_prompt == "A detailed picture of a red fox"
    finally:
        service.close()
    assert openai.state.invalid == []


def test_a_daily_budget_stops_the_first_token_billed_request(
    data_dir: Path, openai: OpenAIStub
) -> None:
    """gpt-image-2 has no per-image price and the ledger is empty: the budget reserves the
    model's cost bound instead of 0, so a $0.001 cap refuses a ~$0.03 image before it is sent."""
    openai.state.reset()
    service = openai_service(data_dir, openai, budgets={"openai": 0.001})
    try:
        request = ImageRequest(prompt="a red fox", model="gpt-image-2", width=1024, height=1024)
        with pytest.raises(errors.BudgetExhaustedError, match=r"budgets\.openai"):
            asyncio.run(service.generate(request))
        assert openai.state.requests == []  # nothing was sent, nothing billed
        assert service.ledger.rows() == []
    finally:
        service.close()


def providers(stub: StabilityStub) -> dict[str, Any]:
    return {"stability": {"base_url": stub.url, "api_key": KEY, **FAST}}


def test_charged_moderation_is_booked_under_the_request_id(
    data_dir: Path, stability: StabilityStub
) -> None:
    """Stability answers a filtered image with 200 and bills it: the ledger row of that
    charge carries the id of the request that paid it (it used to get a random one)."""
    stability.state.script("generate", variant("filtered"))
    service = ImageService(Settings(data_dir=data_dir, providers=providers(stability)))
    try:
        request = ImageRequest(
            prompt="a teapot",
            model="stability-core",
            width=256,
            height=256,
            seed=3,
            request_id="img_charged_moderation",
        )
        with pytest.raises(errors.ContentFilteredError):
            asyncio.run(service.generate(request))
        (row,) = service.ledger.rows()
        assert row["request_id"] == "img_charged_moderation"
        assert row["status"] == "filtered" and row["cost_usd"] == pytest.approx(0.03)
    finally:
        service.close()


def test_hosted_job_answers_at_once_and_reports_running(
    tmp_path: Path, tiny_models_dir: Path, stability: StabilityStub
) -> None:
    # The provider takes a while: POST /v1/jobs must not wait for it.
    stability.state.script("generate", delay(1.0))
    settings = tiny_settings(
        fresh_data_dir(tmp_path, tiny_models_dir),
        models=[],
        top={"providers": providers(stability)},
    )
    with live_server(settings) as server, server.client() as client:
        created = client.post(
            "/v1/jobs", json={"prompt": "a lighthouse", "model": "stability-core", "seed": 1}
        )
        assert created.status_code == 202, created.text
        job = created.json()
        # Answered before the provider: not finished yet.
        assert job["status"] in ("queued", "running")
        seen = [job["status"]]
        deadline = time.monotonic() + 60
        while seen[-1] not in ("succeeded", "failed") and time.monotonic() < deadline:
            status = client.get(f"/v1/jobs/{job['id']}").json()["status"]
            if status != seen[-1]:
                seen.append(status)
            time.sleep(0.02)
        assert "running" in seen and seen[-1] == "succeeded", seen
        assert seen == sorted(seen, key=["queued", "running", "succeeded"].index)
        result = client.get(f"/v1/jobs/{job['id']}").json()["result"]
        assert result["imagegen"]["provider"] == "stability" and len(result["data"]) == 1


def test_prompt_weighting_reaches_a_hosted_model_as_plain_text_on_every_surface(
    tmp_path: Path, tiny_models_dir: Path, stability: StabilityStub
) -> None:
    """A1111's attention syntax sent to a hosted model, through the OpenAI route and the A1111
    route alike: the provider gets the text without it, and both answers say it was dropped."""
    settings = tiny_settings(
        fresh_data_dir(tmp_path, tiny_models_dir),
        models=[],
        top={"providers": providers(stability)},
    )
    prompt = "a (lighthouse:1.4) at [dusk]"
    with live_server(settings) as server, server.client() as client:
        openai = client.post(
            "/v1/images/generations",
            json={"prompt": prompt, "model": "stability-core", "seed": 1},
        )
        assert openai.status_code == 200, openai.text
        assert "prompt weighting" in openai.json()["imagegen"]["dropped_params"]
        a1111 = client.post(
            "/sdapi/v1/txt2img",
            json={
                "prompt": prompt,
                "negative_prompt": "(fog:1.2)",
                "seed": 2,
                "width": 1024,
                "height": 1024,
                "override_settings": {"sd_model_checkpoint": "stability-core"},
            },
        )
        assert a1111.status_code == 200, a1111.text
        info = json.loads(a1111.json()["info"])
        assert "prompt weighting" in info["imagegen"]["dropped_params"]
    forms = [request.form or {} for request in stability.state.of("generate")]
    assert [form["prompt"] for form in forms] == ["a lighthouse at dusk"] * 2
    assert forms[1]["negative_prompt"] == "fog"
