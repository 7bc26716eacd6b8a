"""Streaming (`stream: true`, `partial_images`) through the real openai SDK against a live server,
and live previews where they are watched: job events and A1111's /sdapi/v1/progress. Previews
cost nothing when nobody listens: the device renders none."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image

from tests.helpers_images import gradient, png
from tests.helpers_server import (
    API_KEY,
    LiveServer,
    WatchedRunner,
    fresh_data_dir,
    metric_value,
    tiny_settings,
    watched_server,
)
from tests.stubs.common import reply
from tests.stubs.openai_stub import OpenAIStub, content_policy_violation

DEADLINE_S = 60  # only stops a hung test


@pytest.fixture(scope="module")
def watched(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[tuple[LiveServer, WatchedRunner]]:
    data = fresh_data_dir(tmp_path_factory.mktemp("stream"), tiny_models_dir)
    # The cache off: a streamed and a plain request of one seed both run on the device.
    settings = tiny_settings(
        data, api_keys=[API_KEY], preview_every_steps=1, top={"cache_max_bytes": 0}
    )
    with watched_server(settings) as live:
        yield live


def sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


EXTRA = {"steps": 4, "negative_prompt": "blurry"}


@pytest.mark.parametrize("partials", [0, 1, 3])
def test_a_stream_yields_its_partials_then_the_image_of_the_plain_call(
    server: LiveServer, device: WatchedRunner, partials: int
) -> None:
    client = sdk(server)
    seed = 100 + partials
    events = list(
        client.images.generate(
            model="tiny-sdxl",
            prompt="a lighthouse at dusk",
            size="64x64",
            stream=True,
            partial_images=partials,
            extra_body={**EXTRA, "seed": seed},
        )
    )
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * partials + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:-1]] == list(range(partials))
    # The device rendered exactly the previews the stream sent.
    assert device.batches[-1].previews == partials
    for event in events[:-1]:
        assert decoded(event.b64_json).format == "PNG"
        assert event.size == "64x64" and event.output_format == "png"
    # Each partial is another step's state.
    assert len({event.b64_json for event in events[:-1]}) == partials
    completed = events[-1]
    assert completed.usage is not None and completed.usage.total_tokens == 0
    assert completed.model_extra is not None and completed.model_extra["seed"] == seed
    plain = client.images.generate(
        model="tiny-sdxl",
        prompt="a lighthouse at dusk",
        size="64x64",
        extra_body={**EXTRA, "seed": seed},
    )
    assert plain.data is not None
    # Byte for byte what the plain call gives (the cache is off: both ran on the device).
    assert base64.b64decode(completed.b64_json) == base64.b64decode(plain.data[0].b64_json or "")
    # ... and that plain call rendered no preview at all.
    assert device.batches[-1].previews == 0


def test_partials_are_previews_of_each_requests_own_state(server: LiveServer) -> None:
    client = sdk(server)

    def partials(seed: int) -> list[str]:
        stream = client.images.generate(
            model="tiny-sdxl",
            prompt="a lighthouse at dusk",
            size="64x64",
            stream=True,
            partial_images=2,
            extra_body={**EXTRA, "seed": seed},
        )
        return [e.b64_json for e in stream if e.type == "image_generation.partial_image"]

    first, again, other = partials(7), partials(7), partials(8)
    assert first == again  # the same seed, the same denoising states
    assert not set(first) & set(other)


def test_several_images_stream_each_their_own_partials(
    server: LiveServer, device: WatchedRunner
) -> None:
    with server.client(API_KEY) as http:
        response = http.post(
            "/v1/images/generations",
            json={
                "model": "tiny-sdxl",
                "prompt": "two kites",
                "size": "64x64",
                "n": 2,
                "seed": 5,
                "steps": 4,
                "stream": True,
                "partial_images": 2,
            },
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    partial = [e for e in events if e["type"] == "image_generation.partial_image"]
    completed = [e for e in events if e["type"] == "image_generation.completed"]
    assert [(e["partial_image_index"], e["image_index"]) for e in partial] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert [e["image_index"] for e in completed] == [0, 1]
    assert [e["seed"] for e in completed] == [5, 6]
    assert events[-1]["type"] == "image_generation.completed"
    assert device.batches[-1].previews == 4


def test_an_edit_streams_image_edit_events(server: LiveServer) -> None:
    client = sdk(server)
    events = list(
        client.images.edit(
            model="tiny-sdxl",
            image=("in.png", png(gradient(64, 64)), "image/png"),
            prompt="make it blue",
            size="64x64",
            stream=True,
            partial_images=2,
            extra_body={"seed": 3, "steps": 4, "strength": "1.0"},
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert decoded(events[-1].b64_json).size == (64, 64)


def test_a_refusal_before_admission_is_a_plain_http_error(server: LiveServer) -> None:
    client = sdk(server)
    with pytest.raises(openai.NotFoundError) as caught:
        list(
            client.images.generate(
                model="no-such-model", prompt="x", size="64x64", stream=True, partial_images=1
            )
        )
    assert "no-such-model" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(
            model="tiny-sdxl",
            prompt="x",
            size="64x64",
            stream=True,
            extra_body={"partial_images": 4},
        )
    assert "partial_images" in str(bad.value)


def test_a_job_refuses_stream_and_its_events_carry_previews(
    server: LiveServer, device: WatchedRunner
) -> None:
    body = {"model": "tiny-sdxl", "prompt": "a fox", "size": "64x64", "seed": 9, "steps": 4}
    with server.client(API_KEY) as http:
        refused = http.post("/v1/jobs", json={**body, "stream": True})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "stream"
        # Held after its first step, so the subscriber is there for the rest.
        device.hold()
        job = http.post("/v1/jobs", json=body).json()
        try:
            assert device.holding.wait(DEADLINE_S)
            with http.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=DEADLINE_S) as events:
                device.release()
                progress = [e for e in iter_sse(events) if e.get("step")]
        finally:
            device.release()
    # Step 1 ran before anyone listened: no preview. Every later step (every_steps=1) has one.
    with_preview = [e["step"] for e in progress if "preview" in e]
    assert with_preview and with_preview[-1] == 4 and 1 not in with_preview
    assert decoded(progress[-1]["preview"]).size == (64, 64)


def test_a1111_progress_shows_the_preview_once_polled(
    server: LiveServer, device: WatchedRunner
) -> None:
    auth = httpx.BasicAuth("user", API_KEY)
    release = threading.Event()
    # The device busy with other work, so the A1111 call waits in the queue.
    server.service.registry.worker.call(release.wait)
    result: dict[str, Any] = {}

    def call() -> None:
        with httpx.Client(base_url=server.url, auth=auth, timeout=DEADLINE_S) as http:
            result["response"] = http.post(
                "/sdapi/v1/txt2img",
                json={"prompt": "a harbour", "steps": 4, "width": 64, "height": 64, "seed": 4},
            )

    thread = threading.Thread(target=call)
    device.hold()
    try:
        thread.start()
        with httpx.Client(base_url=server.url, auth=auth, timeout=DEADLINE_S) as http:
            # Polled while queued: nothing to show yet, but previews are now wanted.
            deadline = time.monotonic() + DEADLINE_S
            while http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0:
                assert time.monotonic() < deadline
            assert http.get("/sdapi/v1/progress").json()["current_image"] is None
            release.set()
            assert device.holding.wait(DEADLINE_S)
            shown = http.get("/sdapi/v1/progress").json()
            assert shown["state"]["sampling_step"] == 1
            assert decoded(shown["current_image"]).size == (64, 64)
            # skip_current_image leaves it out, as in A1111.
            skipped = http.get("/sdapi/v1/progress", params={"skip_current_image": "true"})
            assert skipped.json()["current_image"] is None
    finally:
        release.set()
        device.release()
        thread.join(DEADLINE_S)
    assert result["response"].status_code == 200


def test_a_client_that_leaves_a_stream_stops_the_work(
    server: LiveServer, device: WatchedRunner
) -> None:
    body = {"prompt": "a long road", "size": "64x64", "steps": 8, "stream": True}
    first = len(device.batches)
    with server.client(API_KEY) as http:
        billed = http.get("/v1/stats").json()["requests"]
        left = metric_value(http.get("/metrics").text, "imagegen_requests_total", status="499")
        device.hold()
        try:
            with http.stream("POST", "/v1/images/generations", json=body) as response:
                # Admitted: the answer has begun (queued), and the batch is mid-run.
                assert response.status_code == 200
                assert device.holding.wait(DEADLINE_S)
            http.close()  # the connection goes with it
            with server.client(API_KEY) as probe:
                deadline = time.monotonic() + DEADLINE_S
                while (
                    metric_value(
                        probe.get("/metrics").text, "imagegen_requests_total", status="499"
                    )
                    == left
                ):
                    assert time.monotonic() < deadline, "the server never saw the client leave"
                    time.sleep(0.02)
        finally:
            device.release()
    with server.client(API_KEY) as http:
        quick = http.post("/v1/images/generations", json={"prompt": "next", "steps": 2})
        assert quick.status_code == 200
        (stopped, served) = device.batches[first:]
        assert stopped.prompts == ["a long road"] and served.prompts == ["next"]
        assert 1 <= stopped.steps < 8
        # Work nobody received is neither billed nor cached.
        assert http.get("/v1/stats").json()["requests"] == billed + 1


def test_a_hosted_model_streams_its_image_and_a_later_failure_is_an_error_event(
    keyed: LiveServer, stub: OpenAIStub
) -> None:
    """A provider shows no intermediate state: no partials, the image. Once the request is
    under way (sent to the provider) the answer has begun: a refusal then is an error event,
    which the SDK raises as APIError with our message."""
    client = sdk(keyed)
    stub.state.reset()
    events = list(
        client.images.generate(
            model="gpt-image-2", prompt="a red fox", size="1024x1024", stream=True, partial_images=2
        )
    )
    assert [e.type for e in events] == ["image_generation.completed"]
    assert events[0].model_extra is not None
    assert events[0].model_extra["imagegen"]["provider"] == "openai"
    assert stub.state.invalid == []
    stub.state.script("generate", reply(400, content_policy_violation()))
    with pytest.raises(openai.APIError) as caught:
        list(
            client.images.generate(
                model="gpt-image-2", prompt="a red fox", size="1024x1024", stream=True
            )
        )
    assert "safety" in str(caught.value).lower() or "policy" in str(caught.value).lower()


def sse_events(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


def iter_sse(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            event = json.loads(line.removeprefix("data: "))
            yield event
            if event.get("status") in ("succeeded", "failed", "cancelled"):
                return
