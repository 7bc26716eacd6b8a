"""The local diffusers backend (any family of models.local.families): the Backend contract over
a PipelineRunner that a DeviceWorker thread owns."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from models.base import (
    NO_EVENTS,
    Backend,
    BackendIdentity,
    BackendResult,
    Events,
    GenerationParams,
    InvalidParamsError,
    ModelSpec,
    PromptTooLongError,
)
from models.local.pipeline import PipelineRunner, RuntimeOptions
from models.local.runtime import dtype_name, pick_device
from models.local.worker import DeviceWorker, WorkItem

_MAX_SIDE = 4096


class DiffusersBackend(Backend):
    def __init__(
        self,
        spec: ModelSpec,
        *,
        data_dir: Path,
        worker: DeviceWorker,
        options: RuntimeOptions,
    ) -> None:
        self.spec = spec
        self.worker = worker
        self.runner = PipelineRunner(spec, data_dir=data_dir, options=options)
        self.family = self.runner.family
        self._load_lock = asyncio.Lock()

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
        # A LoRA that does not fit is refused here, before the request is queued.
        self.runner.adapters.check(params.loras)
        return dataclasses.replace(
            params, scheduler=scheduler, steps=steps, guidance_scale=guidance
        )

    def unsupported(self, params: GenerationParams) -> str | None:
        # Every local family takes LoRA adapters (resolve() checks each one fits the model).
        return super().unsupported(dataclasses.replace(params, loras=()))

    def dropped_params(self, params: GenerationParams) -> tuple[str, ...]:
        """OpenAI knobs a local diffusion model has no equivalent for."""
        return tuple(params.given("quality", "style", "background", "moderation"))

    def check_prompt(self, prompt: str) -> None:
        limit = self.runner.max_prompt_tokens
        used = self.runner.count_tokens(prompt)
        if used > limit:
            raise PromptTooLongError(
                f"prompt is {used} tokens; model '{self.spec.name}' takes at most {limit}. "
                "Shorten it (imagegen never truncates prompts silently)",
                param="prompt",
            )

    def identity(self, params: GenerationParams) -> BackendIdentity:
        resolved = self.runner.resolve_source()
        device = self.runner.device or pick_device(self.runner.options.device)
        dtype = self.runner.dtype_name or dtype_name(self.family, device)
        return BackendIdentity(
            backend=f"local:{self.spec.kind}",
            model_revision=resolved.revision,
            pipeline=self.runner.pipeline_name(),
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
        return self.runner.pipe is not None

    def admit(self, params: GenerationParams) -> None:
        self.worker.admit(params.n)

    async def load(self) -> None:
        async with self._load_lock:
            if self.loaded:
                return
            await asyncio.wrap_future(self.worker.call(self.runner.load))

    async def generate(
        self,
        params: GenerationParams,
        events: Events = NO_EVENTS,
        *,
        precise: bool = False,
    ) -> BackendResult:
        await self.load()
        item = WorkItem(
            params=params,
            runner=self.runner,
            precise=precise,
            events=events,
        )
        result = await self.worker.run(item)
        return BackendResult(
            images=tuple(result.images),
            provider="local",
            gpu_seconds=result.device_seconds,
            dropped_params=self.dropped_params(params),
            deterministic=True,
        )

    async def close(self) -> None:
        if self.loaded:
            await asyncio.wrap_future(self.worker.call(self.runner.unload))
