"""Scheduler (sampler) names as users know them from A1111/ComfyUI, mapped to diffusers classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str
    overrides: tuple[tuple[str, Any], ...] = ()


SDXL_SCHEDULERS: dict[str, SchedulerChoice] = {
    "euler": SchedulerChoice("EulerDiscreteScheduler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": SchedulerChoice(
        "DPMSolverMultistepScheduler", (("use_karras_sigmas", True),)
    ),
    "ddim": SchedulerChoice("DDIMScheduler"),
    "unipc": SchedulerChoice("UniPCMultistepScheduler"),
}

# Flux is a flow-matching model: only flow-matching schedulers apply.
FLUX_SCHEDULERS: dict[str, SchedulerChoice] = {
    "flow_euler": SchedulerChoice("FlowMatchEulerDiscreteScheduler"),
}


def choices_for(kind: str) -> dict[str, SchedulerChoice]:
    return FLUX_SCHEDULERS if kind == "flux" else SDXL_SCHEDULERS


def build(kind: str, name: str, base_config: Any) -> Any:
    """A fresh scheduler of the named kind, configured from the model's own scheduler config."""
    import diffusers

    choice = choices_for(kind)[name]
    cls = getattr(diffusers, choice.class_name)
    return cls.from_config(base_config, **dict(choice.overrides))
