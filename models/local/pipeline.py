"""One loaded diffusers pipeline (of a family in models.local.families), the pipelines of its
other tasks made from it, and the batched call that turns a group of compatible requests into
images. Not thread-safe: exactly one worker thread owns each runner."""

from __future__ import annotations

import inspect
import io
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.base import (
    GeneratedImage,
    GenerationParams,
    ModelSpec,
    ModelUnavailableError,
    OutOfMemoryError,
    Task,
)
from models.local import (
    families,
    footprints,
    fullsize,
    images,
    schedulers,
    sources,
    weighted_embeds,
)
from models.local.adapters import Adapters
from models.local.loras import LoraLibrary
from models.local.previews import LatentPreviewer
from models.local.residency import Mode, Where
from models.local.runtime import dtype_name, pick_device, pick_dtype, quiet_libraries

log = logging.getLogger(__name__)

# Prompt token counts remembered per runner (cleared whole when full: simple and bounded).
_TOKEN_COUNTS_KEPT = 1024


@dataclass(frozen=True)
class RuntimeOptions:
    """How pipelines run on this host (from settings.local)."""

    device: str = "auto"
    attention: str = "sdpa"
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    compile: bool = False
    flux_true_cfg_scale: float = 4.0
    # The LoRA library (models.local.loras) and how many adapters stay loaded per pipeline.
    lora_dir: Path | None = None
    max_loaded_loras: int = 8


# What a step reports: (step, total, render), where render(i) is the preview of image i of the
# call (a small PIL image, or None), computed only if called.
StepHook = Callable[[int, int, Callable[[int], Any]], None]


@dataclass
class BatchOutput:
    images: list[list[GeneratedImage]]  # per request, in request order
    device_seconds: float
    # What the call took above the memory allocated before it, at its peak (CUDA's allocator
    # counters; None where the device has none): the worker's activation estimates.
    peak_bytes: int | None = None


class PipelineRunner:
    """Loads one model's pipeline and runs batches on it."""

    def __init__(self, spec: ModelSpec, *, data_dir: Path, options: RuntimeOptions) -> None:
        self.spec = spec
        self.family = families.family(spec.kind)
        self.data_dir = data_dir
        self.options = options
        # The pipeline built from the weights (of the family's `loads` task).
        self.pipe: Any = None
        # Per task, the pipeline that runs it: `pipe` itself, or one made from it with
        # from_pipe (the same modules), kept for the next request of that task.
        self.pipes: dict[Task, Any] = {}
        self.resolved: sources.ResolvedSource | None = None
        self.device = ""
        self.dtype_name = ""
        self._base_scheduler_config: Any = None
        # The scheduler name each pipeline runs with; from_pipe shares the scheduler object
        # at creation only, so a later choice is set per pipeline.
        self._schedulers: dict[int, str] = {}
        self._call_params: dict[Task, frozenset[str]] = {}
        self._interrupt = False
        self._count_tokenizer: Any = None
        self._token_counts: dict[str, int] = {}
        self._previewer: LatentPreviewer | None = None
        self._on_host = False
        # Set once the model proved too big for its device's budget (offload): from then on it
        # runs offloaded, across unloads and loads.
        self._offload = False
        # What CUDA's allocator grew by while the weights loaded (0 elsewhere).
        self._allocated_by_load = 0
        self._scheduler_config: dict[str, object] | None = None
        self.loras = LoraLibrary(
            options.lora_dir or data_dir / "loras", memo_dir=sources.digest_memo_dir(data_dir)
        )
        self.adapters = Adapters(
            self.loras, model=spec.name, kind=spec.kind, max_loaded=options.max_loaded_loras
        )

    # -- loading -------------------------------------------------------------------------

    def resolve_source(self) -> sources.ResolvedSource:
        if self.resolved is None:
            self.resolved = sources.resolve(
                self.spec.source, data_dir=self.data_dir, revision=self.spec.revision
            )
        return self.resolved

    def load(self) -> None:
        if self.pipe is not None:
            return
        quiet_libraries()
        import diffusers
        import torch

        resolved = self.resolve_source()
        if resolved.kind == "single_file" and not self.family.single_file:
            raise ModelUnavailableError(
                f"model '{self.spec.name}': single-file checkpoints are not supported for "
                f"{self.spec.kind} models; use a diffusers folder or a hub id"
            )
        self.device = pick_device(self.options.device)
        dtype = pick_dtype(self.family, self.device)
        self.dtype_name = dtype_name(self.family, self.device)
        log.info("loading %s (%s) on %s", self.spec.name, resolved.kind, self.device)
        cls = getattr(diffusers, self.family.pipeline())
        # Before the weights are read: a random source makes them on the device itself.
        before = _allocated(torch, self.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = self._from_source(cls, resolved, dtype)
        pipe.set_progress_bar_config(disable=True)
        self._configure(pipe, torch)
        self._allocated_by_load = max(0, _allocated(torch, self.device) - before)
        self.pipe = pipe
        self._on_host = False
        self.pipes = {self.family.loads: pipe}
        self._base_scheduler_config = pipe.scheduler.config
        self._schedulers = {}

    def _from_source(self, cls: Any, resolved: sources.ResolvedSource, dtype: Any) -> Any:
        """diffusers is renaming torch_dtype to dtype; the old name works on every supported
        version, so its FutureWarning is silenced by the caller."""
        if resolved.kind == "random":
            # Not wrapped below: made on the device itself, it can run out of the device's
            # memory, and torch's OutOfMemoryError is what the residency manager recovers from.
            return self._random_weights(cls, resolved, dtype)
        try:
            if resolved.kind == "single_file":
                return cls.from_single_file(
                    str(resolved.path), torch_dtype=dtype, local_files_only=True
                )
            return cls.from_pretrained(str(resolved.path), torch_dtype=dtype, local_files_only=True)
        except Exception as exc:
            # What diffusers says about broken weights can quote paths and internals: the
            # log has it whole, the client gets the type.
            log.exception("model %s could not be loaded from %s", self.spec.name, resolved.path)
            raise ModelUnavailableError(
                f"model '{self.spec.name}' could not be loaded from its source "
                f"({type(exc).__name__}); the server log has the details"
            ) from None

    def _random_weights(self, cls: Any, resolved: sources.ResolvedSource, dtype: Any) -> Any:
        """A full-size architecture with random weights (models.local.fullsize), made on the
        device itself. The pipeline of another kind of the family (Kontext) shares its modules."""
        # Offloaded, it lives in host RAM: made there (it may not fit on the device whole).
        where = "cpu" if self.mode == "offloaded" else self.device
        pipe = fullsize.build_pipeline(resolved.path.stem, device=where, dtype=dtype)
        return pipe if type(pipe) is cls else cls.from_pipe(pipe, torch_dtype=dtype)

    def _configure_placement(self, pipe: Any) -> None:
        if self.mode == "offloaded":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)

    def _configure(self, pipe: Any, torch: Any) -> None:
        opts = self.options
        self._configure_placement(pipe)
        if opts.attention == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ModelUnavailableError(
                    "local.attention is 'xformers' but xformers is not installed; "
                    "`pip install imagegen[xformers]` on a CUDA machine or set it to 'sdpa'"
                ) from None
            pipe.enable_xformers_memory_efficient_attention()
        # Otherwise diffusers' default AttnProcessor2_0 already uses PyTorch SDPA.
        if opts.vae_slicing:
            pipe.vae.enable_slicing()
        if opts.vae_tiling or self._offload:
            pipe.vae.enable_tiling()
        if opts.compile:
            denoiser = self.family.denoiser
            setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser)))

    def unload(self) -> None:
        self.pipe = None
        self.pipes = {}
        self.adapters.forget()
        self._on_host = False
        self._previewer = None

    # -- residency (models.local.residency) ------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def where(self) -> Where:
        if self.pipe is None:
            return "disk"
        return "host" if self._on_host else "device"

    @property
    def mode(self) -> Mode:
        """How it runs once loaded: whole on the device; "offloaded" (CUDA, local.cpu_offload
        or too big for the budget: the weights in host RAM, each component moved to the device
        only while it runs, diffusers' model CPU offload, and the VAE in tiles); "tiled" (too
        big on a CPU, whose weights are in host RAM anyway: only the VAE tiling applies)."""
        if self.device.startswith("cuda") and (self.options.cpu_offload or self._offload):
            return "offloaded"
        return "tiled" if self._offload else "whole"

    def offload(self) -> None:
        """Run from now on as a model too big for its device (see `mode`), converting the
        loaded pipeline in place."""
        if self._offload:
            return
        self._offload = True
        if self.pipe is not None:
            if self.mode == "offloaded":
                self.pipe.enable_model_cpu_offload(device=self.device)
            self.pipe.vae.enable_tiling()

    def to_host(self) -> None:
        """Move the weights to host RAM (a later to_device brings them back, faster than a
        load from disk). An offloaded model's are there already: between calls it holds
        nothing on the device."""
        if self.pipe is not None and not self._on_host:
            if self.mode != "offloaded":
                self.pipe.to("cpu")
            self._on_host = True

    def to_device(self) -> None:
        if self.pipe is not None and self._on_host:
            if self.mode != "offloaded":
                self._configure_placement(self.pipe)
            self._on_host = False

    def expected_bytes(self) -> int:
        """What the weights will take on the device once loaded, from the parameter counts
        their files declare (models.local.footprints) at the dtype they will run in; 0 where
        they declare none. Before a first load only: after it, footprint_bytes is measured."""
        resolved = self.resolve_source()
        if resolved.kind == "random":
            parameters: int | None = fullsize.published_parameters(resolved.path.stem)
        else:
            parameters = footprints.declared_parameters(resolved.path)
        if parameters is None:
            return 0
        device = self.device or pick_device(self.options.device)
        return parameters * (4 if dtype_name(self.family, device) == "float32" else 2)

    def footprint_bytes(self) -> int:
        """What it holds on the device: the bytes of every parameter and buffer of the
        pipeline's modules, each tensor once (the pipelines of other tasks share them), or
        more where CUDA's allocator grew by more while it loaded; offloaded, its largest
        component's (the most it moves onto the device at once)."""
        if self.pipe is None:
            return 0
        seen: set[int] = set()
        sizes = []
        for component in self.pipe.components.values():
            if getattr(component, "parameters", None) is None:
                continue
            size = 0
            for tensor in (*component.parameters(), *component.buffers()):
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    size += tensor.numel() * tensor.element_size()
            sizes.append(size)
        if self.mode == "offloaded":
            return max(sizes, default=0)
        return max(sum(sizes), self._allocated_by_load)

    def pipeline_for(self, task: Task) -> Any:
        """The pipeline of `task`, made from the loaded one on first use. torch_dtype is
        passed on purpose: from_pipe casts what it builds to float32 by default, and the
        modules are shared, so that would recast the loaded pipeline's weights too."""
        self.load()
        pipe = self.pipes.get(task)
        if pipe is None:
            import diffusers

            cls = getattr(diffusers, self.family.pipeline(task))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch_dtype: see _from_source
                pipe = cls.from_pipe(self.pipe, torch_dtype=pick_dtype(self.family, self.device))
            pipe.set_progress_bar_config(disable=True)
            self.pipes[task] = pipe
        if task not in self._call_params:
            self._call_params[task] = frozenset(inspect.signature(pipe.__call__).parameters)
        return pipe

    # -- facts ---------------------------------------------------------------------------

    @property
    def max_prompt_tokens(self) -> int:
        """The tokenizer's limit without the begin/end tokens."""
        tok = self.tokenizer()
        return int(tok.model_max_length) - self.family.prompt_tokenizer.special_tokens

    def tokenizer(self) -> Any:
        """The tokenizer that bounds the prompt: its own instance, loaded once (cheap, without
        the model). Never the pipeline's: prompts are counted on the caller's thread while the
        worker thread encodes with the pipeline's, and fast tokenizers are not thread-safe."""
        if self._count_tokenizer is None:
            self._count_tokenizer = _load_tokenizer(
                self.family.prompt_tokenizer, self.resolve_source()
            )
        return self._count_tokenizer

    def count_tokens(self, text: str) -> int:
        # Remembered per prompt text: every request checks its prompt, and clients that vary
        # only the seed send the same text again and again.
        used = self._token_counts.get(text)
        if used is None:
            tok = self.tokenizer()
            used = len(tok(text, add_special_tokens=False)["input_ids"])
            if len(self._token_counts) >= _TOKEN_COUNTS_KEPT:
                self._token_counts.clear()
            self._token_counts[text] = used
        return used

    def shipped_scheduler_config(self) -> dict[str, object]:
        """The scheduler config that came with the weights (read once; part of the cache key)."""
        if self._scheduler_config is None:
            self._scheduler_config = sources.scheduler_config(self.resolve_source())
        return self._scheduler_config

    def pipeline_name(self, task: Task | None = None) -> str:
        return self.family.pipeline(task)

    # -- running -------------------------------------------------------------------------

    def interrupt(self) -> None:
        self._interrupt = True

    def run_batch(
        self,
        batch: Sequence[GenerationParams],
        *,
        precise: bool = False,
        on_step: StepHook | None = None,
        low_memory: bool = False,
    ) -> BatchOutput:
        """One pipeline call for every image of every request in `batch` (all share the batch
        key: model, task, size, steps, strength, guidance, scheduler, whether a negative prompt
        is set, the prompts' chunk count). Prompts go in as text, or as weighted embeddings
        where one uses the attention syntax (models.local.weighted_embeds). Input images and
        masks go in as lists, one per image, so requests with different inputs share the call;
        inpainting results are pasted back per request. The LoRA adapters and their weights
        are part of the key too. `low_memory` decodes in VAE tiles for this call (the worker's
        last try after running out of memory)."""
        import torch

        first = batch[0]
        task = first.task
        pipe = self.pipeline_for(task)
        self.adapters.activate(pipe, first.loras)
        self._use_scheduler(pipe, first.scheduler or "")
        prompts: list[str] = []
        negatives: list[str] = []
        generators: list[Any] = []
        init_images: list[Any] = []
        masks: list[Any] = []
        edits = [images.prepare(params) for params in batch]
        gen_device = "cpu" if self.device == "mps" else self.device
        for params, edit in zip(batch, edits, strict=True):
            for seed in params.image_seeds():
                prompts.append(params.prompt)
                negatives.append(params.negative_prompt or "")
                generators.append(torch.Generator(device=gen_device).manual_seed(seed))
                if edit is not None:
                    init_images.append(edit.image)
                    if edit.mask is not None:
                        masks.append(edit.mask)
        family = self.family
        has_negative = first.negative_prompt is not None and family.negative_prompt != "none"
        steps = int(first.steps or 1)
        kwargs: dict[str, Any] = {
            "num_inference_steps": steps,
            "guidance_scale": float(first.guidance_scale or 0.0),
            "generator": generators,
            "output_type": "np",
            **family.call_kwargs,
        }
        takes = self._call_params[task]
        # SDXL's img2img pipeline takes its size from the image (the request's size already).
        if "width" in takes:
            kwargs.update(width=first.width, height=first.height)
        # Kontext rescales width x height to `max_area` (1 megapixel by default).
        if "max_area" in takes:
            kwargs["max_area"] = first.width * first.height
        if init_images:
            kwargs["image"] = init_images
        if masks:
            kwargs["mask_image"] = masks
        default_strength = family.default_strength.get(task)
        if default_strength is not None:
            kwargs["strength"] = float(
                first.strength if first.strength is not None else default_strength
            )
        if family.sequence_length_from is not None:
            tokenizer = getattr(pipe, family.sequence_length_from)
            kwargs["max_sequence_length"] = int(tokenizer.model_max_length)
        if has_negative and family.negative_prompt == "true_cfg":
            kwargs["true_cfg_scale"] = self.options.flux_true_cfg_scale
        self._interrupt = False

        def callback(p: Any, step: int, _timestep: Any, cb_kwargs: dict[str, Any]) -> Any:
            if on_step is not None:
                latents = cb_kwargs.get("latents")

                def render(index: int) -> Any:
                    return self._preview(latents, index, first.width, first.height)

                # A strength below 1 runs only the tail of the schedule.
                on_step(step + 1, int(getattr(p, "num_timesteps", steps)), render)
            # After on_step, which may have asked to stop (every request of it cancelled).
            if self._interrupt:
                p._interrupt = True
            return cb_kwargs

        kwargs["callback_on_step_end"] = callback
        # The precise mode asks diffusers itself to decode in fp32 (force_upcast: it upcasts the
        # VAE and the latents, then casts the VAE back), which a fixed fp16 VAE turns off.
        upcast = precise and family.precise_vae
        if upcast:
            original_force_upcast = bool(pipe.vae.config.get("force_upcast", False))
            pipe.vae.register_to_config(force_upcast=True)
        tiled = low_memory and not (self.options.vae_tiling or self._offload)
        if tiled:
            pipe.vae.enable_tiling()
        on_cuda = self.device.startswith("cuda")
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        allocated_before = _allocated(torch, self.device)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                # Here for the OOM mapping: weighted prompts run the text encoders themselves.
                kwargs.update(
                    weighted_embeds.prompt_kwargs(
                        pipe, family, prompts, negatives if has_negative else None
                    )
                )
                out = pipe(**kwargs)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError as exc:
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            # torch's text (what was allocated where) is for the operator, not the client.
            log.warning(
                "%s: out of GPU memory for %d image(s): %s", self.spec.name, len(prompts), exc
            )
            raise OutOfMemoryError(
                f"out of GPU memory for {len(prompts)} image(s) at {first.width}x"
                f"{first.height}; lower n or the size, or enable local.vae_tiling / "
                "local.cpu_offload"
            ) from None
        finally:
            if upcast:
                pipe.vae.register_to_config(force_upcast=original_force_upcast)
            if tiled:
                pipe.vae.disable_tiling()
        elapsed = time.perf_counter() - start
        peak = None
        if on_cuda:
            peak = max(0, int(torch.cuda.max_memory_allocated(self.device)) - allocated_before)
        arrays = out.images
        encoded: list[list[GeneratedImage]] = []
        i = 0
        for params, edit in zip(batch, edits, strict=True):
            row = []
            for seed in params.image_seeds():
                pixels, problems = _to_uint8(arrays[i])
                if edit is not None:
                    pixels = edit.paste_back(pixels)
                row.append(_encode(pixels, problems, seed, params))
                i += 1
            encoded.append(row)
        return BatchOutput(images=encoded, device_seconds=elapsed, peak_bytes=peak)

    def _preview(self, latents: Any, index: int, width: int, height: int) -> Any:
        """Image `index`'s preview, or None: a preview that fails never fails the batch."""
        if latents is None:
            return None
        if self._previewer is None:
            self._previewer = LatentPreviewer(self.pipe, packing=self.family.latent_packing)
        try:
            return self._previewer.render(latents, index, width, height)
        except Exception:
            log.exception("%s: preview of step latents failed", self.spec.name)
            return None

    def _use_scheduler(self, pipe: Any, name: str) -> None:
        if not name or name == self._schedulers.get(id(pipe)):
            return
        pipe.scheduler = schedulers.build(self.family.schedulers[name], self._base_scheduler_config)
        self._schedulers[id(pipe)] = name


def _allocated(torch: Any, device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated(device))
    return 0


def _to_uint8(pixels: Any) -> tuple[Any, tuple[str, ...]]:
    """8-bit RGB from the pipeline's floats in [0, 1], with the problems seen on the way."""
    import numpy as np

    warnings: tuple[str, ...] = ()
    if not np.isfinite(pixels).all():
        warnings = ("non-finite values",)
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(pixels, 0.0, 1.0) * 255).round().astype("uint8"), warnings


def _encode(
    array: Any, warnings: tuple[str, ...], seed: int, params: GenerationParams
) -> GeneratedImage:
    from PIL import Image

    image = Image.fromarray(array)
    buf = io.BytesIO()
    fmt = params.output_format
    if fmt == "png":
        image.save(buf, format="PNG")
    elif fmt == "jpeg":
        image.save(buf, format="JPEG", quality=params.output_compression or 95)
    else:
        image.save(buf, format="WEBP", quality=params.output_compression or 95)
    return GeneratedImage(
        data=buf.getvalue(),
        seed=seed,
        width=image.width,
        height=image.height,
        format=fmt,
        warnings=warnings,
        pixels=array,
    )


def _load_tokenizer(spec: families.PromptTokenizer, resolved: sources.ResolvedSource) -> Any:
    if resolved.kind == "single_file":
        # A single checkpoint carries no tokenizer, only the fixed limit of its kind.
        return _FixedLimit(spec.default_max_length)
    if resolved.kind == "random":
        return fullsize.build_tokenizer(resolved.path.stem, spec.subfolder)
    quiet_libraries()
    import transformers

    cls = getattr(transformers, spec.class_name)
    return cls.from_pretrained(str(resolved.path), subfolder=spec.subfolder, local_files_only=True)


class _FixedLimit:
    """Stands in for a tokenizer where only the limit is known; counts words, a lower bound
    that is exact for the common case of one token per word."""

    def __init__(self, limit: int) -> None:
        self.model_max_length = limit

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        del add_special_tokens  # a tokenizer's signature; counted words carry none
        return {"input_ids": [0] * len(text.split())}
