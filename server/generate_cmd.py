"""`imagegen generate`: build the request (or read it back from a PNG), run it through the
service with a progress bar on stderr, and write the images atomically."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, cast

from models.base import Events
from server import errors, pngmeta
from server.cache import atomic_write
from server.service import GenerationResult, ImageRequest, ImageService
from server.settings import Settings

_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}


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
) -> ImageRequest:
    if from_image is not None:
        return request_from_image(from_image)
    if prompt is None:
        raise errors.InvalidRequestError(
            'PROMPT is missing: `imagegen generate "a red fox in the snow"` '
            "(or --from-image FILE.png)",
            param="prompt",
        )
    return ImageRequest(
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


def request_from_image(path: Path) -> ImageRequest:
    """The exact request that made an imagegen PNG (its embedded JSON record). The prompt in
    the record is already expanded, so no preset is applied again."""
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
    return ImageRequest(
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
    paths = []
    for img in result.images:
        name = f"{result.model}-{img.seed}-{img.sha256[:12]}.{_EXT.get(img.format, 'png')}"
        path = out / name
        atomic_write(path, img.data)
        paths.append(path)
    return paths


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
