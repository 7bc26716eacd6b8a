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


def build(choice: SchedulerChoice, base_config: Any) -> Any:
    """A fresh scheduler of the chosen class, configured from the model's own scheduler
    config (which family offers which choices: models.local.families)."""
    import diffusers

    cls = getattr(diffusers, choice.class_name)
    return cls.from_config(base_config, **dict(choice.overrides))
