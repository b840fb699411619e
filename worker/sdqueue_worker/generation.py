"""One pipeline call for a batch of compatible jobs, with per-image seeds.

Each image gets its own CPU ``torch.Generator`` seeded with its seed, so an image generated in
a batch starts from the same initial noise as the same job run alone (and the same noise on
CPU and GPU). A batch may be padded up to a compiled bucket size; padding rows are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdqueue.contract import Img2ImgJob, Txt2ImgJob
from sdqueue_worker.runtime import Runtime

ProgressFn = Callable[[int, int], None]


def _after_step(on_step: Callable[[int], None], step: int, tensors: dict[str, Any]) -> dict[str, Any]:
    """diffusers' ``callback_on_step_end``: report the step, hand the tensors back unchanged."""
    on_step(step)
    return tensors


@dataclass(eq=False)
class GenerationRequest:
    """One job's share of a batch, handed from a task thread to the GPU thread."""

    job: Txt2ImgJob | Img2ImgJob
    job_id: str
    seeds: list[int]
    deadline: float
    lane_rank: int = 0
    init_image: Image.Image | None = None
    on_progress: ProgressFn | None = None
    is_cancelled: Callable[[], bool] | None = None
    future: Future[Any] = field(default_factory=Future)
    batch_images: int = 0
    """Images in the pipeline call this job ran in (set by the GPU thread)."""
    pipeline: str = ""
    """Class name of the pipeline that was called for this job (set by ``run_batch``)."""

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one pipeline call."""
        job = self.job
        strength = job.strength if isinstance(job, Img2ImgJob) else None
        return (job.mode, job.width, job.height, job.steps, job.guidance_scale, job.scheduler, strength)

    @property
    def total_steps(self) -> int:
        job = self.job
        if isinstance(job, Img2ImgJob):
            return min(int(job.steps * job.strength), job.steps)
        return job.steps

    def cancelled(self) -> bool:
        return bool(self.is_cancelled and self.is_cancelled())


def _inputs(batch: list[GenerationRequest], pad_to: int) -> dict[str, list[Any]]:
    rows = [(request, seed) for request in batch for seed in request.seeds]
    rows += [(batch[0], 0)] * max(0, pad_to - len(rows))
    inputs: dict[str, list[Any]] = {
        "prompt": [request.job.prompt for request, _ in rows],
        "negative_prompt": [request.job.negative_prompt for request, _ in rows],
        "generator": [torch.Generator("cpu").manual_seed(seed) for _, seed in rows],
    }
    if batch[0].init_image is not None:
        inputs["image"] = [request.init_image for request, _ in rows]
    return inputs


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[0, 1] NCHW on the device -> NHWC uint8 on the host, one copy."""
    pixels = (images.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
    return pixels.cpu().numpy()


def run_batch(
    runtime: Runtime, batch: list[GenerationRequest], on_step: Callable[[int], None], pad_to: int = 0
) -> list[np.ndarray]:
    """Run one pipeline call for the batch; returns one uint8 array (N, H, W, 3) per request."""
    job = batch[0].job
    pipe = runtime.pipeline_for(job.mode)
    pipe.scheduler = runtime.schedulers[job.scheduler]
    kwargs: dict[str, Any] = dict(
        _inputs(batch, pad_to),
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        output_type="pt",
        callback_on_step_end=lambda _pipe, step, _t, tensors: _after_step(on_step, step, tensors),
    )
    if isinstance(job, Img2ImgJob):
        kwargs["strength"] = job.strength
    else:
        kwargs.update(width=job.width, height=job.height)
    for request in batch:
        request.pipeline = type(pipe).__name__
    with torch.inference_mode():
        images = _to_uint8(pipe(**kwargs).images)
    bounds = np.cumsum([len(request.seeds) for request in batch])
    return list(np.split(images[: bounds[-1]], bounds[:-1]))
