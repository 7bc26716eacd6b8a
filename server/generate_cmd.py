"""`imagegen generate`: build the request (or read it back from a PNG), run it through the
service with a progress bar on stderr, and write the images atomically."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_args

from models.base import Events, InpaintArea
from server import errors, pngmeta
from server.inputs import decode_inputs
from server.request import LoraRequest, MaskConvention, ResizeMode
from server.service import GenerationResult, ImageRequest, ImageService
from server.settings import Settings
from server.store.blobs import STALE_TEMP_S
from server.store.files import atomic_write

_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
# The flag that sets each request field: an error about the field names the flag.
FLAGS = {
    "image": "--image",
    "mask": "--mask",
    "strength": "--strength",
    "mask_blur": "--mask-blur",
    "inpaint_area": "--inpaint-area",
    "inpaint_padding": "--inpaint-padding",
    "resize_mode": "--resize-mode",
    "loras": "--lora",
}


@dataclass(frozen=True)
class EditOptions:
    """The image-input flags of `imagegen generate`, as given."""

    images: Sequence[Path] = ()
    mask: Path | None = None
    strength: float | None = None
    mask_blur: int | None = None
    inpaint_area: str | None = None
    resize_mode: str | None = None
    loras: Sequence[str] = ()

    def apply(self, request: ImageRequest) -> ImageRequest:
        """`request` with the flags' inputs read and set; flag errors name the flag."""
        given: dict[str, Any] = {
            "images": tuple(_read(path, "--image") for path in self.images),
            "mask": _read(self.mask, "--mask") if self.mask is not None else None,
            "loras": tuple(parse_lora(text) for text in self.loras),
        }
        if self.strength is not None:
            given["strength"] = self.strength
        if self.mask_blur is not None:
            given["mask_blur"] = self.mask_blur
        if self.inpaint_area is not None:
            given["inpaint_area"] = _choice(self.inpaint_area, "--inpaint-area", InpaintArea)
        if self.resize_mode is not None:
            given["resize_mode"] = _choice(self.resize_mode, "--resize-mode", ResizeMode)
        return dataclasses.replace(request, **given)


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise errors.InvalidRequestError(
            f"{flag}: cannot read '{path}': {exc.strerror}", param=flag.lstrip("-")
        ) from None


def _choice(value: str, flag: str, kind: Any) -> Any:
    allowed = get_args(kind)
    if value not in allowed:
        raise errors.InvalidRequestError(
            f"{flag} must be one of {', '.join(allowed)}, got '{value}'", param=flag.lstrip("-")
        )
    return value


def parse_lora(text: str) -> LoraRequest:
    """NAME or NAME:WEIGHT (the weight defaults to 1)."""
    name, colon, weight = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        return LoraRequest(name=name.strip(), weight=float(weight) if colon else 1.0)
    except ValueError:
        raise errors.InvalidRequestError(
            f"--lora must be NAME or NAME:WEIGHT (for example watercolor:0.8), got '{text}'",
            param="loras",
        ) from None


def build_request(
    *,
    prompt: str | None,
    negative_prompt: str | None,
    model: str | None,
    width: int | None,
    height: int | None,
    n: int,
    seed: int | None,
    steps: int | None,
    guidance: float | None,
    scheduler: str | None,
    preset: str | None,
    from_image: Path | None,
    local_only: bool,
    edit: EditOptions = EditOptions(),
    max_input_megapixels: float = 16.0,
) -> ImageRequest:
    if from_image is not None:
        return request_from_image(from_image, edit, max_input_megapixels=max_input_megapixels)
    if prompt is None:
        raise errors.InvalidRequestError(
            'PROMPT is missing: `imagegen generate "a red fox in the snow"` '
            "(or --from-image FILE.png)",
            param="prompt",
        )
    request = ImageRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        model=model,
        width=width,
        height=height,
        n=n,
        seed=seed,
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        preset=preset,
        local_only=local_only,
    )
    return edit.apply(request)


def request_from_image(
    path: Path, edit: EditOptions = EditOptions(), *, max_input_megapixels: float = 16.0
) -> ImageRequest:
    """The exact request that made an imagegen PNG (its embedded JSON record). The prompt in
    the record is already expanded, so no preset is applied again. An edit is reproduced
    only with its input image (and mask) given again: `edit` must hold them."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise errors.InvalidRequestError(
            f"--from-image: cannot read '{path}': {exc.strerror}", param="from_image"
        ) from None
    try:
        _, record = pngmeta.read(data)
    except pngmeta.MetadataError as exc:
        raise errors.InvalidRequestError(f"--from-image: {exc}", param="from_image") from None
    if not record or not isinstance(record.get("request"), dict):
        raise errors.InvalidRequestError(
            f"--from-image: '{path}' carries no imagegen metadata; only PNGs written by "
            "imagegen can be reproduced",
            param="from_image",
        )
    req = cast(dict[str, Any], record["request"])
    request = ImageRequest(
        prompt=str(req["prompt"]),
        negative_prompt=req.get("negative_prompt"),
        model=str(req["model"]),
        width=int(req["width"]),
        height=int(req["height"]),
        n=1,
        seed=int(req["seed"]),
        steps=req.get("steps"),
        guidance_scale=req.get("guidance_scale"),
        scheduler=req.get("scheduler"),
        quality=req.get("quality"),
        style=req.get("style"),
        output_format=req.get("output_format") or "png",
        loras=tuple(
            LoraRequest(name=str(name), weight=float(weight))
            for name, _, weight in req.get("loras") or ()
        ),
    )
    inputs = req.get("inputs")
    if isinstance(inputs, dict):
        return _recorded_edit(request, inputs, edit, max_input_megapixels)
    if edit.images or edit.mask is not None:
        raise errors.InvalidRequestError(
            f"--image: '{path}' was not made from an input image; leave out --image and --mask "
            "to reproduce it",
            param="image",
        )
    return request


def _recorded_edit(
    request: ImageRequest,
    inputs: dict[str, Any],
    edit: EditOptions,
    max_input_megapixels: float,
) -> ImageRequest:
    """The recorded edit with the given images, once their normalised pixels hash to the
    recorded ones. The record holds no resize mode or mask convention: each is tried (the
    given --resize-mode only, when given); decoding a handful of times costs milliseconds."""
    wanted = [str(h) for h in inputs.get("images") or ()]
    wanted_mask = inputs.get("mask")
    if not edit.images or (wanted_mask is not None and edit.mask is None):
        what = f"image sha256 {wanted[0][:16]}…" if wanted else "an image"
        mask = f" and mask sha256 {str(wanted_mask)[:16]}… (--mask)" if wanted_mask else ""
        raise errors.InvalidRequestError(
            f"--from-image: this PNG is an edit of {what}{mask}; pass that image with --image "
            "(hashes are of the pixels after EXIF rotation and resizing)",
            param="image",
        )
    given = EditOptions(images=edit.images, mask=edit.mask).apply(request)
    base = dataclasses.replace(
        given,
        strength=inputs.get("strength"),
        mask_blur=int(inputs.get("mask_blur") or 0),
        inpaint_area=inputs.get("inpaint_area") or "whole",
        inpaint_padding=int(inputs.get("inpaint_padding") or 32),
        input_fidelity=inputs.get("input_fidelity"),
    )
    modes: tuple[ResizeMode, ...] = (
        (_choice(edit.resize_mode, "--resize-mode", ResizeMode),)
        if edit.resize_mode
        else get_args(ResizeMode)
    )
    conventions: tuple[MaskConvention, ...] = get_args(MaskConvention)
    images_matched = False
    for mode, convention in itertools.product(modes, conventions):
        candidate = dataclasses.replace(base, resize_mode=mode, mask_convention=convention)
        try:
            decoded = decode_inputs(candidate, max_megapixels=max_input_megapixels)
        except errors.InvalidRequestError as exc:
            if exc.param != "mask":
                raise
            continue  # the mask does not read in this convention (no alpha, say): not it
        assert decoded is not None  # images were given
        if [img.sha256 for img in decoded.images] != wanted:
            continue
        images_matched = True
        if (decoded.mask.sha256 if decoded.mask else None) == wanted_mask:
            return candidate
    if images_matched:
        raise errors.InvalidRequestError(
            f"--mask: the mask does not match this PNG's (sha256 {str(wanted_mask)[:16]}… of the "
            "normalised mask); pass the mask the edit was made with",
            param="mask",
        )
    raise errors.InvalidRequestError(
        f"--image: the image(s) do not match this PNG's input (sha256 "
        f"{', '.join(h[:16] + '…' for h in wanted)} of the normalised pixels); pass the "
        "image(s) the edit was made from, in the same order",
        param="image",
    )


def run(settings: Settings, request: ImageRequest, *, out: Path, as_json: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(_generate(settings, request))
    paths = write_images(result, out)
    if as_json:
        sys.stdout.write(json.dumps(result_json(result, paths)) + "\n")
        return
    from rich.console import Console

    console = Console(stderr=False)
    state = "cached (cost $0)" if result.cached else f"${result.cost_usd:.6f}"
    console.print(
        f"{len(paths)} image(s) from {result.model} via {result.provider}, {state}, "
        f"{result.gpu_seconds:.3f} GPU-s"
    )
    for path, img in zip(paths, result.images, strict=True):
        console.print(f"  {path}  seed {img.seed}  {img.width}x{img.height}")
    if result.dropped_params:
        console.print(f"  dropped: {', '.join(result.dropped_params)}")
    for notice in result.notices:
        console.print(f"  note: {notice}")


def flagged(exc: errors.InvalidRequestError) -> errors.InvalidRequestError:
    """The service's error worded for this edge: the field it names is a flag here."""
    flag = FLAGS.get(exc.param or "")
    if flag is None or exc.message.startswith(("--", flag)):
        return exc
    return errors.InvalidRequestError(f"{flag}: {exc.message}", param=exc.param)


async def _generate(settings: Settings, request: ImageRequest) -> GenerationResult:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    service = ImageService(settings)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=True,
        console=_stderr_console(),
    )
    task = progress.add_task("loading model", total=None)

    class Bar(Events):
        # rich's Progress is thread-safe: the worker thread may update it directly.
        def started(self) -> None:
            progress.update(task, description=f"generating ({request.model or 'default'})")

        def progress(self, step: int, total: int, preview: Any = None) -> None:
            progress.update(task, completed=step, total=total)

    try:
        with progress:
            return await service.generate(request, events=Bar())
    finally:
        await service.aclose()


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def write_images(result: GenerationResult, out: Path) -> list[Path]:
    _remove_stale_temp_files(out)
    paths = []
    for img in result.images:
        name = f"{result.model}-{img.seed}-{img.sha256[:12]}.{_EXT.get(img.format, 'png')}"
        path = out / name
        atomic_write(path, img.data)
        paths.append(path)
    return paths


def _remove_stale_temp_files(out: Path) -> None:
    """A run killed inside atomic_write leaves its temp file in --out, and nothing names it.
    Only stale ones (the blob store's rule): another run may be writing into the folder now."""
    cutoff = time.time() - STALE_TEMP_S
    for path in out.glob(".tmp-*"):
        with contextlib.suppress(OSError):  # renamed or removed meanwhile by its writer
            if path.stat().st_mtime < cutoff:
                path.unlink()


def result_json(result: GenerationResult, paths: list[Path]) -> dict[str, Any]:
    return {
        "request_id": result.request_id,
        "model": result.model,
        "provider": result.provider,
        "cached": result.cached,
        "cost_usd": result.cost_usd,
        "gpu_seconds": result.gpu_seconds,
        "saved_usd": result.saved_usd,
        "revised_prompt": result.revised_prompt,
        "negative_prompt": result.negative_prompt,
        "dropped_params": list(result.dropped_params),
        "notices": list(result.notices),
        "timings": result.timings,
        "params": {
            "steps": result.params.steps,
            "guidance_scale": result.params.guidance_scale,
            "scheduler": result.params.scheduler,
            "width": result.params.width,
            "height": result.params.height,
            "seed": result.params.seed,
        },
        "images": [
            {
                "path": str(path),
                "seed": img.seed,
                "sha256": img.sha256,
                "width": img.width,
                "height": img.height,
                "format": img.format,
                "quality": img.quality,
            }
            for path, img in zip(paths, result.images, strict=True)
        ],
    }
