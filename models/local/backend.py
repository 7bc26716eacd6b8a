"""The local diffusers backend (any family of models.local.families): the Backend contract over
a PipelineRunner that a DeviceWorker thread owns."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models import prompt_weights
from models.base import (
    NO_EVENTS,
    Backend,
    BackendIdentity,
    BackendResult,
    Events,
    GenerationParams,
    InvalidParamsError,
    ModelSpec,
    ModelUnavailableError,
    PromptTooLongError,
)
from models.local import activations, sources
from models.local.devices import DevicePool
from models.local.pipeline import PipelineRunner, RuntimeOptions
from models.local.runtime import dtype_name, pick_device
from models.local.worker import Demand, DeviceWorker, Runner, WorkItem

_MAX_SIDE = 4096


@dataclass(frozen=True)
class _Replica:
    """The model's pipeline on one device: its runner, and what that device's worker runs
    batches on (the runner, or a test's wrapper of it)."""

    worker: DeviceWorker
    runner: PipelineRunner
    device_runner: Runner


class DiffusersBackend(Backend):
    def __init__(
        self,
        spec: ModelSpec,
        *,
        data_dir: Path,
        worker: DeviceWorker | DevicePool,
        options: RuntimeOptions,
        wrap_runner: Callable[[Runner], Runner] | None = None,
    ) -> None:
        """`worker`: the device, or the pool of devices (models.local.devices) whose workers
        each get a replica of the pipeline as placement asks for one."""
        self.spec = spec
        self.pool = worker if isinstance(worker, DevicePool) else DevicePool([worker])
        self.data_dir = data_dir
        self.options = options
        self._wrap_runner = wrap_runner
        self._replicas: dict[int, _Replica] = {}
        # The first device's runner answers the cheap checks (tokenizer, scheduler config,
        # revision), which need no weights and are the same on every device.
        self.runner = self._replica(self.pool.first).runner
        self.family = self.runner.family
        self._load_lock = asyncio.Lock()

    def _replica(self, worker: DeviceWorker) -> _Replica:
        replica = self._replicas.get(id(worker))
        if replica is None:
            options = self.options
            # In a pool of several devices each replica runs on its worker's device; a pool of
            # one keeps the options' device (its worker's name is only a label).
            if len(self.pool.workers) > 1:
                options = dataclasses.replace(options, device=worker.name)
            runner = PipelineRunner(self.spec, data_dir=self.data_dir, options=options)
            # What the worker runs batches on: the runner itself, or a test's fake around it
            # that forces blocking or a failure (the seam BackendRegistry(wrap_runner=...)).
            device_runner = self._wrap_runner(runner) if self._wrap_runner else runner
            replica = self._replicas[id(worker)] = _Replica(worker, runner, device_runner)
        return replica

    # -- cheap checks (no weights) ------------------------------------------------------

    def resolve(self, params: GenerationParams) -> GenerationParams:
        d = self.spec.defaults
        scheduler = params.scheduler or d.scheduler or self.family.default_scheduler
        valid = self.family.schedulers
        if scheduler not in valid:
            raise InvalidParamsError(
                f"scheduler '{scheduler}' is not available for {self.spec.kind} model "
                f"'{self.spec.name}'; choose one of: {', '.join(valid)}",
                param="scheduler",
            )
        m = self.family.size_multiple
        for side, value in (("width", params.width), ("height", params.height)):
            if value % m or not (m <= value <= _MAX_SIDE):
                raise InvalidParamsError(
                    f"size: {side} must be a multiple of {m} between {m} and {_MAX_SIDE} for "
                    f"model '{self.spec.name}', got {value}",
                    param="size",
                )
        steps = params.steps if params.steps is not None else (d.steps or 30)
        guidance = (
            params.guidance_scale
            if params.guidance_scale is not None
            else (d.guidance_scale if d.guidance_scale is not None else 5.0)
        )
        if params.output_format not in ("png", "jpeg", "webp"):
            raise InvalidParamsError(
                f"output_format must be png, jpeg or webp, got '{params.output_format}'",
                param="output_format",
            )
        strength = self._strength(params, steps)
        self._check_input_sizes(params)
        # A LoRA that does not fit is refused here, before the request is queued.
        self.runner.adapters.check(params.loras)
        return dataclasses.replace(
            params, scheduler=scheduler, steps=steps, guidance_scale=guidance, strength=strength
        )

    def _strength(self, params: GenerationParams, steps: int) -> float | None:
        """The family's default where the task takes a strength and none was given; a strength
        where the task takes none is for unsupported() to refuse."""
        default = self.family.default_strength.get(params.task)
        if default is None:
            return params.strength
        strength = default if params.strength is None else params.strength
        if not 0.0 < strength <= 1.0:
            raise InvalidParamsError(
                f"strength must be above 0 and at most 1 (the share of the schedule re-run "
                f"on the input image), got {strength}",
                param="strength",
            )
        # The pipelines run int(steps * strength) steps and refuse none at all.
        if int(steps * strength) < 1:
            raise InvalidParamsError(
                f"strength {strength} with {steps} steps runs no denoising step; raise steps "
                f"to at least {math.ceil(1 / strength)} or raise strength",
                param="strength",
            )
        return strength

    def _check_input_sizes(self, params: GenerationParams) -> None:
        """Input images come resized to the request's size from the edge; "masked" inpainting
        instead crops the image at its own size and generates at the request's."""
        if not params.images:
            return
        image = params.images[0]
        if params.mask is not None and (params.mask.width, params.mask.height) != (
            image.width,
            image.height,
        ):
            raise InvalidParamsError(
                f"mask is {params.mask.width}x{params.mask.height} but the image is "
                f"{image.width}x{image.height}; send a mask of the image's size",
                param="mask",
            )
        if params.task == "inpaint" and params.inpaint_area == "masked":
            return
        if (image.width, image.height) != (params.width, params.height):
            raise InvalidParamsError(
                f"image is {image.width}x{image.height} but the request's size is "
                f"{params.width}x{params.height}; resize the image to the size (or send "
                "size matching the image)",
                param="image",
            )

    def unsupported(self, params: GenerationParams) -> str | None:
        """What this family's pipelines cannot do with `params`. LoRA adapters are taken
        (models.local.loras applies them)."""
        task = params.task
        lacks = self.family.lacks(task)
        if lacks is not None:
            return f"model '{self.spec.name}': {lacks}"
        if params.strength is not None and task not in self.family.default_strength:
            if task == "txt2img":
                return "strength applies to an input image and the request has none"
            return (
                f"model '{self.spec.name}' takes no strength ({self.spec.kind} models take the "
                "input image as a reference, not as a starting point); leave strength unset"
            )
        return None

    def dropped_params(self, params: GenerationParams) -> tuple[str, ...]:
        """OpenAI knobs a local diffusion model has no equivalent for, a negative prompt where
        the family's pipeline takes none, and every input image after the first."""
        dropped = params.given("quality", "style", "background", "moderation", "input_fidelity")
        if self.family.negative_prompt == "none":
            dropped += params.given("negative_prompt")
        if not self.family.prompt_weighting and any(
            prompt_weights.parse(text).weighted
            for text in (params.prompt, params.negative_prompt or "")
        ):
            # Run as the text without the syntax (models.local.weighted_embeds).
            dropped.append("prompt weighting")
        if len(params.images) > 1:
            # The local pipelines take one init (or reference) image; OpenAI-style reference
            # lists are honoured by hosted models only.
            dropped.append("image[1:]")
        return tuple(dropped)

    def check_prompt(self, prompt: str) -> None:
        """The prompt as the pipeline gets it: without its attention syntax, and where the
        family weights embeddings, per BREAK-separated chunk with each weighted segment
        tokenized apart (models.local.weighted_embeds). A chunk over the limit is refused,
        never split: A1111 would carry the overflow into a new chunk at a place of its
        choosing; here the user places every BREAK."""
        limit = self.runner.max_prompt_tokens
        parsed = prompt_weights.parse(prompt)
        if not (self.family.prompt_weighting and parsed.weighted):
            counts = [self.runner.count_tokens(parsed.text)]
        else:
            counts = [sum(self.runner.count_tokens(s.text) for s in c) for c in parsed.chunks]
        weighting = self.family.prompt_weighting
        fix = "shorten it or split it with BREAK" if weighting else "shorten it"
        for i, used in enumerate(counts):
            if used > limit:
                where = (
                    f"prompt part {i + 1} (parts split at BREAK)" if len(counts) > 1 else "prompt"
                )
                raise PromptTooLongError(
                    f"{where} is {used} tokens; model '{self.spec.name}' takes at most {limit}"
                    f"{' per part' if weighting else ''}; {fix} "
                    "(imagegen never truncates prompts silently)",
                    param="prompt",
                )

    def identity(self, params: GenerationParams) -> BackendIdentity:
        resolved = self.runner.resolve_source()
        device = self.runner.device or pick_device(self.runner.options.device)
        dtype = self.runner.dtype_name or dtype_name(self.family, device)
        return BackendIdentity(
            backend=f"local:{self.spec.kind}",
            model_revision=resolved.revision,
            # A task the family lacks is refused (unsupported()) before any key is made.
            pipeline=self.runner.pipeline_name(
                params.task if params.task in self.family.pipelines else None
            ),
            dtype=dtype,
            device=device.split(":")[0],
            scheduler_config=self.runner.shipped_scheduler_config(),
            extra={
                "attention": self.runner.options.attention,
                "true_cfg_scale": (
                    self.runner.options.flux_true_cfg_scale
                    if self.family.negative_prompt == "true_cfg"
                    and params.negative_prompt is not None
                    else None
                ),
            },
        )

    # -- running ------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return any(r.runner.pipe is not None for r in self._replicas.values())

    def admit(self, params: GenerationParams) -> None:
        self.pool.place(Demand.of(params))

    def weights_revision(self) -> str | None:
        # Only weights already on disk are looked at: a built-in tiny model is not built, nor a
        # hub repo searched for beyond the local cache, just to be named.
        runner = self.runner
        if (
            runner.resolved is None
            and not sources.availability(self.spec.source, data_dir=runner.data_dir).on_disk
        ):
            return None
        try:
            return runner.resolve_source().revision
        except ModelUnavailableError:
            return None

    async def load(self, worker: DeviceWorker | None = None) -> None:
        """Load the weights on `worker` (default: where the next request would go) unless a
        copy is there already, in its memory or its host tier."""
        async with self._load_lock:
            if worker is None:
                if self.loaded:
                    return
                worker = self.pool.place(Demand(self.spec.name, 1))
            replica = self._replica(worker)
            if replica.runner.pipe is None:
                await asyncio.wrap_future(worker.make_resident(replica.runner))

    async def generate(
        self,
        params: GenerationParams,
        events: Events = NO_EVENTS,
        *,
        precise: bool = False,
    ) -> BackendResult:
        worker = self.pool.place(Demand.of(params))
        replica = self._replica(worker)
        if replica.runner.where != "device":
            events.loading(self.spec.name)
        await self.load(worker)
        item = WorkItem(
            params=params,
            runner=replica.device_runner,
            precise=precise,
            events=events,
            resident=replica.runner,
            memory_prior=activations.prior_bytes(
                self.family.activation_gib_per_megapixel,
                params.width,
                params.height,
                dtype_bytes=4 if replica.runner.dtype_name == "float32" else 2,
            ),
        )
        result = await worker.run(item)
        return BackendResult(
            images=tuple(result.images),
            provider="local",
            gpu_seconds=result.device_seconds,
            dropped_params=self.dropped_params(params),
            deterministic=True,
        )

    async def close(self) -> None:
        for replica in self._replicas.values():
            if replica.runner.pipe is not None and replica.worker.fault is None:
                await asyncio.wrap_future(replica.worker.call(replica.runner.unload))
