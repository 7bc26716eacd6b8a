"""The `imagegen` command line: generate, models, stats (and serve, batch, presets where those
features live). Errors are one line on stderr: exit 2 for bad input, 1 for failures."""

from __future__ import annotations

import json
import os
import sys
import tomllib
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from server import errors
from server.request_schema import parse_size

app = typer.Typer(
    name="imagegen",
    help="Image generation on your own GPU (SDXL, Flux) or hosted APIs, one path for all.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: flags read as flags (the rich formatter prints a "<bool>" type after each).
    rich_markup_mode=None,
)

T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML settings file (IMAGEGEN_* env vars win).")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


class _State:
    debug = False


# Exit code per error class (the first class of an error's MRO found here): 2 for what the
# caller can fix (bad input, a blocked prompt, an unknown or refused model), 1 for failures.
_EXIT_CODES: dict[type[errors.ImagegenError], int] = {
    errors.InvalidRequestError: 2,
    errors.ModelNotFoundError: 2,
}


def exit_code_of(exc: errors.ImagegenError) -> int:
    for cls in type(exc).__mro__:
        code = _EXIT_CODES.get(cls)
        if code is not None:
            return code
    return 1


def fail(message: str, code: int) -> NoReturn:
    """Each line of `message` (one problem per line) as an error line on stderr, then exit."""
    for line in message.splitlines() or [""]:
        typer.echo(f"imagegen: error: {line}", err=True)
    raise typer.Exit(code)


def run_guarded(fn: Callable[[], T]) -> T:
    """One place that turns errors into a line on stderr and an exit code."""
    from models.catalogue import CatalogueError
    from server.settings import ConfigFileError

    try:
        return fn()
    except typer.Exit:
        raise
    except errors.ImagegenError as exc:
        if _State.debug:
            traceback.print_exc()
        fail(exc.message, exit_code_of(exc))
    except (ConfigFileError, CatalogueError) as exc:
        fail(str(exc), 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:
        if _State.debug:
            traceback.print_exc()
        else:
            typer.echo("(run again with --debug for the traceback)", err=True)
        fail(f"{type(exc).__name__}: {exc}", 1)


def load_settings_or_exit(config: Path | None, **overrides: Any) -> Any:
    from pydantic import ValidationError

    from server.settings import ConfigFileError, load_settings

    try:
        return load_settings(config, **overrides)
    except ConfigFileError as exc:
        fail(str(exc), 2)
    except tomllib.TOMLDecodeError as exc:
        fail(f"--config: '{config}' is not valid TOML: {exc}", 2)
    except ValidationError as exc:
        # Every problem at once (fixing them one run at a time is tedious); input values are
        # left out, as one may be a key.
        problems = exc.errors(include_input=False, include_url=False)
        fail("\n".join(_settings_problem(problem) for problem in problems), 2)


def _settings_problem(problem: Any) -> str:
    where = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        return f"settings: {where} is not a setting; check its spelling (the README lists them)"
    return f"settings: {where}: {problem['msg']}"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A table for a person at a terminal; for a pipe, one tab-separated line per row with
    every value whole (a rich table would cut names to the pipe's assumed 80 columns)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    for line in [headers, *rows]:
        typer.echo("\t".join(value.replace("\t", " ").replace("\n", " ") for value in line))


def with_service(settings: Any, fn: Callable[[Any], T]) -> T:
    """`fn(service)` on an ImageService opened for it and closed after."""
    from server.service import ImageService

    service = ImageService(settings)
    try:
        return fn(service)
    finally:
        service.close()


def print_listing(
    rows: list[dict[str, Any]],
    as_json: bool,
    headers: list[str],
    cells: Callable[[dict[str, Any]], list[str]],
) -> None:
    """A listing command's output: the rows as JSON, or a table of `cells` of each row."""
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    print_table(headers, [cells(row) for row in rows])


@app.callback()
def _root(ctx: typer.Context, debug: DebugOpt = False) -> None:
    _State.debug = debug
    # Never reach the network for weights unless the user says so (`imagegen pull`).
    if ctx.invoked_subcommand != "pull":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


@app.command()
def pull(
    model: Annotated[str, typer.Argument(help="Catalogue name or hub repo id.")],
    config: ConfigOpt = None,
) -> None:
    """Download a hub model's weights into the Hugging Face cache (HF_HOME)."""
    settings = load_settings_or_exit(config)

    def go() -> None:
        from models.catalogue import Catalogue
        from models.local import sources

        spec = Catalogue.load(settings.models).get(model)
        source = spec.source if spec is not None else model
        if spec is not None and not spec.is_local:
            raise errors.InvalidRequestError(
                f"model '{model}' is hosted by {spec.kind}; there are no weights to pull",
                param="model",
            )
        if sources.classify(source) != "hub":
            raise errors.InvalidRequestError(
                f"'{source}' is not a hub repo id; only hub models can be pulled", param="model"
            )
        path = sources.download_hub_model(source, spec.revision if spec else None)
        typer.echo(f"{source}: {path}")

    run_guarded(go)


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m")] = None,
    size: Annotated[str | None, typer.Option("--size", help="WIDTHxHEIGHT")] = None,
    n: Annotated[int, typer.Option("-n", "--n", help="Number of images.")] = 1,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    steps: Annotated[int | None, typer.Option("--steps")] = None,
    guidance: Annotated[float | None, typer.Option("--guidance")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler")] = None,
    preset: Annotated[str | None, typer.Option("--preset")] = None,
    from_image: Annotated[
        Path | None,
        typer.Option("--from-image", help="Reproduce an imagegen PNG (an edit: with --image)."),
    ] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="Input image: img2img, inpainting, edits (repeatable)."),
    ] = None,
    mask: Annotated[
        Path | None, typer.Option("--mask", help="Inpainting mask: white = repaint.")
    ] = None,
    strength: Annotated[
        float | None, typer.Option("--strength", help="Share of the schedule re-run (0-1].")
    ] = None,
    mask_blur: Annotated[
        int | None, typer.Option("--mask-blur", help="Feather the mask edge (pixels).")
    ] = None,
    inpaint_area: Annotated[
        str | None, typer.Option("--inpaint-area", help="whole | masked (crop around the mask).")
    ] = None,
    resize_mode: Annotated[
        str | None, typer.Option("--resize-mode", help="crop | stretch | pad, to --size.")
    ] = None,
    lora: Annotated[
        list[str] | None, typer.Option("--lora", help="NAME or NAME:WEIGHT (repeatable).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the images.")] = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    local_only: Annotated[bool, typer.Option("--local-only")] = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Generate images and write them as PNG files."""
    _State.debug = _State.debug or debug
    from server import generate_cmd

    settings = load_settings_or_exit(config)

    def go() -> None:
        width, height = parse_size(size)
        edit = generate_cmd.EditOptions(
            images=image or (),
            mask=mask,
            strength=strength,
            mask_blur=mask_blur,
            inpaint_area=inpaint_area,
            resize_mode=resize_mode,
            loras=lora or (),
        )
        request = generate_cmd.build_request(
            prompt=prompt,
            negative_prompt=negative_prompt,
            model=model,
            width=width,
            height=height,
            n=n,
            seed=seed,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            preset=preset,
            from_image=from_image,
            local_only=local_only,
            edit=edit,
            max_input_megapixels=settings.server.max_input_megapixels,
        )
        generate_cmd.run(settings, request, out=out, as_json=as_json)

    def flagged() -> None:
        try:
            go()
        except errors.InvalidRequestError as exc:
            raise generate_cmd.flagged(exc) from None

    run_guarded(flagged)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            help="A running server's URL: list its models with where each is loaded "
            "(device, host RAM, disk), its footprint, and each device's memory.",
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="IMAGEGEN_API_KEY", show_default=False)
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """The model catalogue and whether each model can be used here."""
    if server is not None:
        from server import models_cmd

        def remote() -> None:
            body = models_cmd.fetch(server, api_key)
            if as_json:
                typer.echo(json.dumps(body, indent=2))
                return
            print_table(models_cmd.MODEL_HEADERS, [models_cmd.model_cells(c) for c in body["data"]])
            if body.get("devices"):
                typer.echo("")
                print_table(
                    models_cmd.DEVICE_HEADERS,
                    [models_cmd.device_cells(d) for d in body["devices"]],
                )

        run_guarded(remote)
        return
    settings = load_settings_or_exit(config)
    run_guarded(
        lambda: print_listing(
            with_service(settings, lambda service: service.models()),
            as_json,
            ["model", "kind", "provider", "available", "on disk", "source"],
            lambda row: [
                row["name"],
                row["kind"],
                row["provider"],
                "yes" if row["available"] else "no (see --json)",
                "built-in" if row.get("builtin") else ("yes" if row["on_disk"] else "no"),
                f"alias of {row['alias_of']}" if row.get("alias_of") else row["source"],
            ],
        )
    )


@app.command()
def loras(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOpt = None,
) -> None:
    """The LoRA library (local.lora_dir): name, the family each fits, file hash and size."""
    settings = load_settings_or_exit(config)

    def go() -> None:
        rows = with_service(settings, lambda service: service.loras())
        if not rows and not as_json:
            typer.echo(f"no LoRAs in {settings.lora_dir} (local.lora_dir)", err=True)
        print_listing(
            rows,
            as_json,
            ["lora", "family", "format", "sha256", "size"],
            lambda row: [
                row["name"],
                row["family"] or "unknown",
                row["format"],
                row["sha256"],
                str(row["size_bytes"]),
            ],
        )

    run_guarded(go)


@app.command()
def stats(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOpt = None,
) -> None:
    """Totals and per-model rows from the cost ledger."""
    settings = load_settings_or_exit(config)

    def go() -> None:
        from server.service import ImageService

        # The same figures as GET /v1/stats (ledger totals, the cache, the GPU-hour rate).
        service = ImageService(settings)
        try:
            data = service.stats()
        finally:
            service.close()
        if as_json:
            typer.echo(json.dumps(data, indent=2))
            return
        typer.echo(
            f"requests {data['requests']}  images {data['images']}  cached {data['cached']}  "
            f"failed {data['failed']}  cost ${data['cost_usd']:.6f}  "
            f"gpu-seconds {data['gpu_seconds']:.3f}  saved ${data['saved_usd']:.6f}"
        )
        print_table(
            ["model", "provider", "requests", "images", "cached", "cost USD", "GPU s", "saved USD"],
            [
                [
                    r["model"],
                    r["provider"],
                    str(r["requests"]),
                    str(r["images"]),
                    str(r["cached"]),
                    f"{r['cost_usd']:.6f}",
                    f"{r['gpu_seconds']:.3f}",
                    f"{r['saved_usd']:.6f}",
                ]
                for r in data["models"]
            ],
        )

    run_guarded(go)


@app.command()
def migrate(config: ConfigOpt = None) -> None:
    """Bring the store's schema (store.url, or the data directory's SQLite file) up to this
    version. Every start does the same; this is for doing it first, or on its own."""
    settings = load_settings_or_exit(config)

    def go() -> None:
        from server.store import schema
        from server.store.sql import open_database

        url = settings.store.url
        try:
            db = open_database(
                url.get_secret_value() if url else None, path=settings.db_path, migrate=False
            )
        except ValueError as exc:
            fail(str(exc), 2)
        try:
            done = schema.migrate(db)
            have = schema.applied(db)
        finally:
            db.close()
        now = f"applied {', '.join(map(str, done))}" if done else "nothing to apply"
        typer.echo(f"store {db!r}: schema version {have[-1]} ({now})")

    run_guarded(go)


@app.command()
def serve(
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Load at start (repeatable).")
    ] = None,
    host: Annotated[str | None, typer.Option("--host")] = None,
    port: Annotated[int | None, typer.Option("--port")] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="Allow a public bind without API keys.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Serve the OpenAI-compatible HTTP API (FastAPI + uvicorn)."""
    settings = load_settings_or_exit(config)

    def go() -> None:
        from server import serve_cmd

        serve_cmd.run(
            settings,
            models=model or [],
            host=host,
            port=port,
            insecure_no_auth=insecure_no_auth,
        )

    run_guarded(go)


@app.command()
def batch(
    file: Annotated[Path, typer.Argument(help="JSONL (one request per line) or CSV file.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for images and manifest.")],
    model: Annotated[str | None, typer.Option("--model", "-m")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency")] = 4,
    budget_usd: Annotated[float | None, typer.Option("--budget-usd")] = None,
    resume: Annotated[bool, typer.Option("--resume")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    preset: Annotated[str | None, typer.Option("--preset")] = None,
    allow_absolute_paths: Annotated[
        bool,
        typer.Option(
            "--allow-absolute-paths",
            help="Let image/mask cells name files outside the batch file's folder.",
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Run a file of requests; resumable, with a manifest and a cost cap."""
    settings = load_settings_or_exit(config)

    def go() -> None:
        from server import batch_cmd

        code = batch_cmd.run(
            settings,
            file=file,
            out=out,
            model=model,
            concurrency=concurrency,
            budget_usd=budget_usd,
            resume=resume,
            dry_run=dry_run,
            preset=preset,
            allow_absolute_paths=allow_absolute_paths,
        )
        if code:
            raise typer.Exit(code)

    run_guarded(go)


@app.command()
def presets(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOpt = None,
) -> None:
    """The prompt presets (built-in and from the config file)."""
    settings = load_settings_or_exit(config)

    def go() -> None:
        from server.presets import PresetBook

        book = PresetBook.load(settings.presets)
        rows = [
            {
                "name": p.name,
                "template": p.template,
                "negative_prompt": p.negative_prompt,
                "description": p.description,
            }
            for p in (book.get(name) for name in book.names())
        ]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        print_table(
            ["preset", "template", "negative prompt"],
            [[row["name"], row["template"], row["negative_prompt"] or ""] for row in rows],
        )

    run_guarded(go)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        sys.exit(_usage_error(exc))
    sys.exit(code if isinstance(code, int) else 0)


def _usage_error(exc: Exception) -> int:
    """Click's own errors (a typo in an option, an unknown command) as one line and exit 2,
    like every other bad input. Matched by shape: Typer may vendor its own copy of click."""
    name = type(exc).__name__
    ctx = getattr(exc, "ctx", None)
    if name == "NoArgsIsHelpError" and ctx is not None:
        typer.echo(ctx.get_help())
        return 0
    if name == "Abort":
        typer.echo("imagegen: error: interrupted", err=True)
        return 130
    message = getattr(exc, "format_message", None)
    exit_code = getattr(exc, "exit_code", None)
    if not callable(message) or not isinstance(exit_code, int):
        raise exc
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    typer.echo(f"imagegen: error: {message()}{hint}", err=True)
    return exit_code


if __name__ == "__main__":
    main()
