"""Model residency on a GPU with full-size models; prints ONE JSON object, exit 1 if a check fails.

    python scripts/gpu_residency.py            # full-size SDXL and Flux (random weights) on cuda
    python scripts/gpu_residency.py --tiny     # the same steps on the tiny models (a dry run, CPU)

Full-size SDXL base 1.0 and FLUX.1-dev architectures with seeded random weights (the
`random:<arch>` sources, models.local.fullsize: no download), on one device worker whose budget
holds either model but not both (--budget-gb; the defaults fit an H200: SDXL fp16 takes about
6.5 GiB, Flux bf16 about 31.4 GiB; with --tiny, the larger tiny model and half the other).
Steps, each a request through DiffusersBackend as the server runs it (1024x1024, --steps
denoising steps):

1. SDXL, then Flux, then SDXL, Flux, SDXL: each switch evicts the other model to host RAM and
   loads or brings back this one. Figures: every move of weights with its time (load,
   to_host, restore), the device's allocated memory after each request, and its peak.
   Checks: after each switch the device holds what it held the last time the same model was
   resident, within 5 % (what an evicted model held is handed back); between requests it
   never holds more than the budget; the peak of the whole run stays within the budget and
   the reserve (the activations' room); at the end, with both unloaded, it is back at the
   baseline within 5 % of the larger model.
2. A batch that would not fit (--huge images of SDXL at 1024x1024), with the device itself
   capped at budget + reserve (torch.cuda.set_per_process_memory_fraction: a real allocator
   out-of-memory past it) and the activation estimate told each image needs 1 byte, so that
   the batch is attempted whole: it runs out of memory and is recovered by splitting.
   Checks: every image is returned; the worker's log shows the out-of-memory; the next batch
   of that size is split before it runs (no second out-of-memory).
3. The same batch on a fresh estimate: the first request measures the working memory of
   one image; the huge batch is then split by the measured estimate and never runs out.

The measured working memory per image (GiB per megapixel) of each model is reported beside
the families' priors (models.local.families.Family.activation_gib_per_megapixel).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.base import GenerationParams, ModelSpec
from models.local import families
from models.local.activations import ActivationMemory
from models.local.backend import DiffusersBackend
from models.local.pipeline import RuntimeOptions
from models.local.residency import Residency
from models.local.worker import DeviceWorker

GIB = 1024**3
FULL = {
    "sdxl-random": ("sdxl", "random:sdxl-base-1.0"),
    "flux-random": ("flux", "random:flux.1-dev"),
}
TINY = {"tiny-sdxl": ("sdxl", "builtin:tiny-sdxl"), "tiny-flux": ("flux", "builtin:tiny-flux")}
WITHIN = 0.05


class _OutOfMemoryLog(logging.Handler):
    """Counts the worker's out-of-memory warnings (each one an attempt that ran out)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "out of memory" in record.getMessage():
            self.count += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny models on the CPU")
    parser.add_argument("--budget-gb", type=float, default=35.0, help="GiB for loaded models")
    parser.add_argument("--reserve-gb", type=float, default=4.0, help="GiB for activations")
    parser.add_argument("--host-gb", type=float, default=48.0, help="GiB of host RAM tier")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--huge", type=int, default=16, help="images of the batch that won't fit")
    args = parser.parse_args()

    import torch

    models = TINY if args.tiny else FULL
    device = "cpu" if args.tiny else "cuda"
    size = 64 if args.tiny else args.size
    cuda = device == "cuda"
    if not args.tiny and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: run with --tiny for the dry run"}))
        return 1
    oom_log = _OutOfMemoryLog()
    logging.getLogger("models.local").addHandler(oom_log)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    budget = int(args.budget_gb * GIB)
    reserve = int(args.reserve_gb * GIB)
    residency = Residency(
        device=device,
        budget_bytes=budget,
        host_budget_bytes=int(args.host_gb * GIB) if cuda else 0,
        reserve_bytes=reserve,
    )
    worker = DeviceWorker(
        name=device, residency=residency, max_batch_images=64, max_queue_images=256
    )
    data_dir = Path(tempfile.mkdtemp(prefix="imagegen-gpu-residency-"))
    backends = {
        name: DiffusersBackend(
            ModelSpec(name=name, kind=kind, source=source),
            data_dir=data_dir,
            worker=worker,
            options=RuntimeOptions(device=device),
        )
        for name, (kind, source) in models.items()
    }
    sdxl, flux = list(models)
    if args.tiny:
        # Room for the larger tiny model and half the other: every switch evicts.
        expected = {name: backend.runner.expected_bytes() for name, backend in backends.items()}
        residency.budget_bytes = budget = max(expected.values()) + min(expected.values()) // 2

    def allocated() -> int | None:
        return int(torch.cuda.memory_allocated()) if cuda else None

    def generate(name: str, n: int = 1, seed: int = 1) -> float:
        params = GenerationParams(
            prompt="a lighthouse at dusk",
            model=name,
            width=size,
            height=size,
            n=n,
            seed=seed,
            steps=args.steps,
            guidance_scale=5.0 if models[name][0] == "sdxl" else 3.5,
            scheduler=families.family(models[name][0]).default_scheduler,
        )
        start = time.perf_counter()
        result = asyncio.run(backends[name].generate(params))
        assert len(result.images) == n, f"{name}: {len(result.images)} of {n} images"
        return time.perf_counter() - start

    report: dict[str, Any] = {"device": device, "models": list(models), "size": size}
    if cuda:
        report["gpu"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()
    baseline = allocated()
    checks: dict[str, bool] = {}
    try:
        # 1. Switching back and forth.
        switches = []
        held: dict[str, int | None] = {}
        for turn, name in enumerate([sdxl, flux, sdxl, flux, sdxl]):
            seconds = generate(name, seed=turn)
            now = allocated()
            switches.append({"model": name, "request_s": round(seconds, 3), "allocated": now})
            if now is not None and name in held and held[name] is not None:
                previous = held[name]
                assert previous is not None
                checks[f"switch {turn}: back to its level"] = abs(now - previous) <= (
                    WITHIN * previous
                )
            held[name] = now
            if now is not None:
                checks[f"switch {turn}: within the budget"] = now - (baseline or 0) <= budget
        report["switches"] = switches
        report["moves"] = [
            {"kind": m.kind, "model": m.model, "seconds": round(m.seconds, 3)}
            for m in residency.moves
        ]
        report["footprints_gib"] = {
            p.name: round(p.footprint_bytes / GIB, 3) for p in residency.places()
        }
        if cuda:
            footprints = [p.footprint_bytes for p in residency.places()]
            checks["both models do not fit the budget"] = sum(footprints) > budget
            peak = int(torch.cuda.max_memory_allocated())
            report["peak_gib"] = round(peak / GIB, 3)
            checks["peak within budget + reserve"] = peak - (baseline or 0) <= budget + reserve
        report["activation_gib_per_megapixel"] = {
            model: round(per_image / GIB / (w * h / 1e6), 3)
            for (model, w, h), per_image in worker.memory.measured().items()
        }
        report["priors_gib_per_megapixel"] = {
            name: families.family(kind).activation_gib_per_megapixel
            for name, (kind, _) in models.items()
        }

        # 2. A huge batch attempted whole, on a device capped at budget + reserve.
        if cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (budget + reserve) / total))
        worker.memory = ActivationMemory()
        worker.memory.record(sdxl, size, size, images=10**9, peak_bytes=1)
        ran_out_before = oom_log.count
        calls_before = worker.pipeline_calls
        huge_s = generate(sdxl, n=args.huge, seed=100)
        forced: dict[str, Any] = {
            "images": args.huge,
            "seconds": round(huge_s, 3),
            "out_of_memory": oom_log.count - ran_out_before,
            "calls": worker.pipeline_calls - calls_before,
        }
        ran_out_before = oom_log.count
        calls_before = worker.pipeline_calls
        forced["again_seconds"] = round(generate(sdxl, n=args.huge, seed=200), 3)
        forced["again_out_of_memory"] = oom_log.count - ran_out_before
        forced["again_calls"] = worker.pipeline_calls - calls_before
        report["forced_out_of_memory"] = forced
        if cuda:
            checks["huge batch ran out of memory and was recovered"] = (
                forced["out_of_memory"] >= 1 and forced["calls"] >= 2
            )
            checks["next huge batch split before it ran"] = (
                forced["again_out_of_memory"] == 0 and forced["again_calls"] >= 2
            )

        # 3. Split by the measured estimate from the start.
        worker.memory = ActivationMemory()
        generate(sdxl, n=1, seed=300)
        ran_out_before = oom_log.count
        calls_before = worker.pipeline_calls
        measured_s = generate(sdxl, n=args.huge, seed=400)
        report["measured_split"] = {
            "seconds": round(measured_s, 3),
            "calls": worker.pipeline_calls - calls_before,
            "out_of_memory": oom_log.count - ran_out_before,
        }
        if cuda:
            checks["measured estimate splits without running out"] = (
                report["measured_split"]["out_of_memory"] == 0
            )
            torch.cuda.set_per_process_memory_fraction(1.0)

        # Everything unloaded: back to the baseline.
        for backend in backends.values():
            asyncio.run(backend.close())
        if cuda:
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            end = allocated() or 0
            largest = max(p.footprint_bytes for p in residency.places())
            report["allocated_at_end"] = end
            checks["back to the baseline at the end"] = abs(end - (baseline or 0)) <= (
                WITHIN * largest
            )
    finally:
        worker.stop()
    report["baseline"] = baseline
    report["checks"] = checks
    report["ok"] = all(checks.values())
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
