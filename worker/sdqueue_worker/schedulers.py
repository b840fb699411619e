"""The small named set of schedulers a job may ask for."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SCHEDULER_CLASSES: dict[str, Any] = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}


def build_schedulers(default: Any) -> dict[str, Any]:
    """One scheduler object per name, all from the model's own scheduler config.

    Built once at start-up; a job runs with its scheduler set on the pipeline it calls
    (the GPU thread runs one pipeline call at a time, so sharing is safe).
    """
    config = default.config
    schedulers = {name: cls.from_config(config) for name, cls in SCHEDULER_CLASSES.items()}
    schedulers["default"] = default
    return schedulers
