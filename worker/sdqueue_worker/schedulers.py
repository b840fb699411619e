"""The named schedulers a job may ask for, with the names A1111 and ComfyUI users know.

| name | diffusers class | options |
| --- | --- | --- |
| ``default`` | the model's own scheduler | |
| ``euler`` | EulerDiscreteScheduler | |
| ``euler_a`` | EulerAncestralDiscreteScheduler | (ancestral: noise from the job's seed) |
| ``euler_karras`` | EulerDiscreteScheduler | ``use_karras_sigmas=True`` |
| ``heun`` | HeunDiscreteScheduler | (two UNet calls per step) |
| ``lms`` / ``lms_karras`` | LMSDiscreteScheduler | ``use_karras_sigmas`` |
| ``ddim`` | DDIMScheduler | |
| ``dpmpp_2m`` / ``dpmpp_2m_karras`` | DPMSolverMultistepScheduler | ``use_karras_sigmas`` |
| ``dpmpp_2m_sde`` / ``dpmpp_2m_sde_karras`` | DPMSolverMultistepScheduler | ``algorithm_type="sde-dpmsolver++"`` |
| ``dpmpp_sde`` / ``dpmpp_sde_karras`` | DPMSolverSDEScheduler (needs ``torchsde``) | ``noise_sampler_seed`` = the image seeds |
| ``pndm`` | PNDMScheduler | |
| ``unipc`` | UniPCMultistepScheduler | |
| ``lcm`` | LCMScheduler | for LCM-distilled models or an LCM LoRA (4-8 steps, guidance 1-2) |

Each is built from the model's own scheduler config, so beta schedule and timestep spacing
stay the model's. Stochastic samplers draw their noise from each image's own generator (or, for
DPM++ SDE, a Brownian tree per image seeded with its seed), so a batched image equals the same
job run alone.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
SCHEDULER_CLASSES: dict[str, tuple[Any, dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, KARRAS),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "lms_karras": (LMSDiscreteScheduler, KARRAS),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, KARRAS),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, SDE),
    "dpmpp_2m_sde_karras": (DPMSolverMultistepScheduler, {**SDE, **KARRAS}),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}),
    "dpmpp_sde_karras": (DPMSolverSDEScheduler, KARRAS),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}


def build_schedulers(default: Any) -> dict[str, Any]:
    """One scheduler object per name, all from the model's own scheduler config.

    Built once at start-up; a job runs with its scheduler set on the pipeline it calls
    (the GPU thread runs one pipeline call at a time, so sharing is safe).
    """
    config = default.config
    schedulers = {
        name: cls.from_config(config, **options) for name, (cls, options) in SCHEDULER_CLASSES.items()
    }
    schedulers["default"] = default
    return schedulers


def seed_noise_sampler(scheduler: Any, row_seeds: list[int]) -> None:
    """DPM++ SDE draws its noise from Brownian trees, not the generators: one tree per image,
    seeded with that image's seed (left unset, diffusers seeds it at random on every call)."""
    if isinstance(scheduler, DPMSolverSDEScheduler):
        scheduler.noise_sampler_seed = list(row_seeds)
