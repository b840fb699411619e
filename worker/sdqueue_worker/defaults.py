"""Per-model defaults filled in by the worker: a job that leaves out width or height gets the
model's native size (``unet.sample_size x vae_scale_factor``: 512 for SD 1.x, 1024 for SDXL).

Filled in before the job is batched or written down, so the batch key, the images and the
manifest's ``spec`` all see the final size.
"""

from __future__ import annotations

from typing import Any

from sdqueue.contract import AnyJob, check_pixels
from sdqueue.errors import JobValidationError


def native_side(pipe: Any) -> int:
    """The side length the model was trained at."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def with_model_size(job: AnyJob, side: int) -> AnyJob:
    """``job`` with width and height set (the model's native side where the job named none)."""
    if job.width is not None and job.height is not None:
        return job
    width, height = job.width or side, job.height or side
    try:
        check_pixels(width, height)
    except ValueError as exc:
        raise JobValidationError(f"invalid job: {exc} (with the model's default side {side})") from None
    return job.model_copy(update={"width": width, "height": height})


def size_of(job: AnyJob) -> tuple[int, int]:
    """Width and height of a job whose size the worker has filled in."""
    if job.width is None or job.height is None:
        raise RuntimeError("job size not filled in (with_model_size runs first)")
    return job.width, job.height
