"""Routes: the AUTOMATIC1111 web UI API at the root, /sdapi/v1/* (what webuiapi, SillyTavern,
Open WebUI's automatic1111 engine and LibreChat's SD tool call; SillyTavern drops any path
prefix). Generation goes through the one serving path; bodies are read by a1111_schema, per-
caller settings and controls live in a1111_state, errors are A1111's shape (server.http.errors)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server import errors, pngmeta
from server.http.a1111_checkpoints import Checkpoint, checkpoint, checkpoints, model_named
from server.http.a1111_schema import AUTOMATIC, Img2ImgBody, Txt2ImgBody
from server.http.a1111_state import A1111Call
from server.http.auth import caller_of
from server.http.errors import NotFoundError
from server.http.middleware import request_id_of
from server.http.serving import response_headers, unless_disconnected
from server.http.state import AppState, app_state
from server.quotas import Caller
from server.request import ImageRequest
from server.samplers import A1111_SAMPLERS
from server.service import GenerationResult

router = APIRouter(prefix="/sdapi/v1", tags=["A1111"])

# A1111's clients block on one call and never retry a 429 (SillyTavern and webuiapi set no
# timeout; A1111 itself queues everything): a full device queue is waited out, re-asking this
# often, for up to this long, and only then answered 429.
QUEUE_WAIT_S = 300.0
QUEUE_POLL_S = 0.25


@router.post("/txt2img")
async def txt2img(body: Txt2ImgBody, request: Request) -> JSONResponse:
    return await _generate(body, request, endpoint="a1111_txt2img")


@router.post("/img2img")
async def img2img(body: Img2ImgBody, request: Request) -> JSONResponse:
    return await _generate(body, request, endpoint="a1111_img2img")


async def _generate(body: Txt2ImgBody, request: Request, *, endpoint: str) -> JSONResponse:
    state = app_state(request)
    who = caller_of(request.scope)
    caller = who.id
    request_id = request_id_of(request.scope)
    timeout_s = state.serving.deadline_s(request.headers)
    wanted = body.checkpoint()
    model = (
        await model_named(state, wanted) if wanted is not None else _default_model(state, caller)
    )
    call = state.a1111.begin(
        caller,
        body.force_task_id or request_id or "",
        preview_every=state.settings.server.preview_every_steps,
    )
    call.task = asyncio.ensure_future(
        _run_waiting(
            state,
            lambda: body.to_image_request(model=model, request_id=request_id),
            endpoint=endpoint,
            model=model,
            call=call,
            timeout_s=timeout_s,
            caller=who,
        )
    )
    try:
        result = await unless_disconnected(request.is_disconnected, call.task)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not call.interrupted or (task is not None and task.cancelling()):
            raise
        # Interrupted by the caller (POST /interrupt): A1111 answers 200 with what it has;
        # nothing is finished here, so no images.
        return JSONResponse(
            {"images": [], "parameters": body.echo(), "info": json.dumps({"interrupted": True})}
        )
    finally:
        state.a1111.end(caller, call)
    served = await checkpoint(state, result.model)
    return JSONResponse(
        {
            "images": (
                [base64.b64encode(image.data).decode("ascii") for image in result.images]
                if body.send_images is not False
                else []
            ),
            "parameters": body.echo(),
            "info": json.dumps(_info(result, body, served)),
        },
        headers=response_headers(result),
    )


async def _run_waiting(
    state: AppState,
    build: Callable[[], ImageRequest],
    *,
    endpoint: str,
    model: str | None,
    call: A1111Call,
    timeout_s: float | None,
    caller: Caller,
) -> GenerationResult:
    deadline = time.monotonic() + QUEUE_WAIT_S
    while True:
        try:
            return await state.serving.run(
                build,
                endpoint=endpoint,
                model=model,
                events=call,
                timeout_s=timeout_s,
                caller=caller,
            )
        except errors.QueueFullError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            await asyncio.sleep(min(QUEUE_POLL_S, left))


def _info(result: GenerationResult, body: Txt2ImgBody, served: Checkpoint) -> dict[str, Any]:
    """A1111's `info` (modules/processing.py Processed.js) for what was generated."""
    params = result.params
    seeds = [seed if seed is not None else params.seed for seed in result.seeds]
    n = len(result.images)
    prompt = body.prompt or ""
    negative = body.negative_prompt or ""
    infotexts = [
        pngmeta.read(image.data)[0] or "" for image in result.images if image.format == "png"
    ]
    return {
        "prompt": prompt,
        "all_prompts": [prompt] * n,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * n,
        "seed": seeds[0] if seeds else params.seed,
        "all_seeds": seeds,
        # No subseeds here (variation seeds are not supported): A1111's "none" is -1.
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": params.width,
        "height": params.height,
        "sampler_name": A1111_SAMPLERS.get(params.scheduler or "", params.scheduler),
        "cfg_scale": params.guidance_scale,
        "steps": params.steps,
        "batch_size": body.batch_size or 1,
        "restore_faces": False,
        "sd_model_name": result.model,
        "sd_model_hash": served.hash,
        "denoising_strength": params.strength if params.images else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        # imagegen's own: what this server did with the request.
        "imagegen": {
            "request_id": result.request_id,
            "model": result.model,
            "provider": result.provider,
            "cached": result.cached,
            "cost_usd": result.cost_usd,
            "ignored_params": body.ignored(),
            "dropped_params": sorted(result.dropped_params),
            "notices": list(result.notices),
        },
    }


# -- models and options ----------------------------------------------------------------------


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return [
        {
            "title": found.title,
            "model_name": found.name,
            "hash": found.hash,
            "sha256": found.sha256,
            "filename": found.name,
            "config": None,
            # An extension, in a key of its own so that A1111's shape stays as clients read it.
            **({"imagegen": dict(found.placement)} if found.placement else {}),
        }
        for found in await checkpoints(app_state(request))
    ]


def _default_model(state: AppState, caller: str) -> str | None:
    """The model the caller set with POST /options, while the catalogue still has it: it is
    kept across restarts, and the catalogue may have changed in between."""
    model = state.a1111.default_model(caller)
    return model if model is not None and state.service.knows_model(model) else None


@router.post("/refresh-checkpoints")
async def refresh_checkpoints() -> None:
    # The catalogue is read at start-up; there is nothing to rescan.
    return None


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    state = app_state(request)
    model = _default_model(state, caller_of(request.scope).id) or state.settings.default_model
    current = await checkpoint(state, model)
    return {
        # A1111's shape: the title as in /sd-models (Open WebUI matches the two), the sha256.
        "sd_model_checkpoint": current.title,
        "sd_checkpoint_hash": current.sha256,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "sd_lora": "None",
    }


@router.post("/options")
async def set_options(request: Request) -> None:
    """Takes the whole dict a client echoes back (Open WebUI does); applies only
    sd_model_checkpoint, as the default model of this caller's A1111 calls."""
    state = app_state(request)
    try:
        body = await request.json()
    except ValueError:
        raise errors.InvalidRequestError(
            "the options body must be a JSON object", param="body"
        ) from None
    if not isinstance(body, dict):
        raise errors.InvalidRequestError("the options body must be a JSON object", param="body")
    wanted = body.get("sd_model_checkpoint")
    if wanted:
        model = await model_named(state, str(wanted))
        state.a1111.set_default_model(caller_of(request.scope).id, model)
    return None


# -- lists -----------------------------------------------------------------------------------


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [
        {"name": name, "aliases": [ours], "options": {}} for ours, name in A1111_SAMPLERS.items()
    ]


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    # Only what changes anything here: "karras" picks "DPM++ 2M Karras" for "DPM++ 2M".
    return [
        {
            "name": name,
            "label": label,
            "aliases": None,
            "default_rho": -1,
            "need_inner_model": False,
        }
        for name, label in ((AUTOMATIC, "Automatic"), ("karras", "Karras"))
    ]


@router.get("/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    # Off the loop: the first listing of a file hashes it.
    rows = await asyncio.to_thread(app_state(request).service.loras)
    return [
        {
            "name": row["name"],
            "alias": row["name"],
            "path": row["name"],
            "metadata": {"sha256": row["sha256"], "family": row["family"]},
        }
        for row in rows
    ]


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/upscalers")
async def upscalers() -> list[dict[str, Any]]:
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/latent-upscale-modes")
async def latent_upscale_modes() -> list[dict[str, Any]]:
    return []


@router.get("/sd-vae")
async def sd_vae() -> list[dict[str, Any]]:
    return []


# -- progress and controls -------------------------------------------------------------------


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    return app_state(request).a1111.progress(
        caller_of(request.scope).id, show_image=not skip_current_image
    )


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    app_state(request).a1111.interrupt(caller_of(request.scope).id)
    return {}


@router.post("/skip")
async def skip(request: Request) -> None:
    # One call is one job here: skipping its current image is stopping it.
    app_state(request).a1111.interrupt(caller_of(request.scope).id)
    return None


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
async def not_served(rest: str, request: Request) -> None:
    raise NotFoundError(
        f"/sdapi/v1/{rest} is not served here; the A1111 routes served are txt2img, img2img, "
        "options, sd-models, samplers, schedulers, loras, progress, interrupt, skip, scripts, "
        "upscalers, sd-vae, latent-upscale-modes and refresh-checkpoints",
        param="path",
    )
