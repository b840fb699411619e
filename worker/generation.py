"""One pipeline call for a batch of compatible jobs, with per-image seeds.

Each image gets its own CPU ``torch.Generator`` seeded with its seed, so an image generated in
a batch starts from the same initial noise as the same job run alone (and the same noise on
CPU and GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from producer.contract import Img2ImgJob, Txt2ImgJob
from worker.runtime import Runtime

ProgressFn = Callable[[int, int], None]


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
    future: Future = field(default_factory=Future)

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


def _inputs(batch: list[GenerationRequest]) -> dict[str, list[Any]]:
    prompts, negatives, generators, images = [], [], [], []
    for request in batch:
        for seed in request.seeds:
            prompts.append(request.job.prompt)
            negatives.append(request.job.negative_prompt)
            generators.append(torch.Generator("cpu").manual_seed(seed))
            if request.init_image is not None:
                images.append(request.init_image)
    inputs: dict[str, list[Any]] = {"prompt": prompts, "negative_prompt": negatives, "generator": generators}
    if images:
        inputs["image"] = images
    return inputs


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def run_batch(runtime: Runtime, batch: list[GenerationRequest],
              on_step: Callable[[int], None]) -> list[np.ndarray]:
    """Run one pipeline call for the batch; returns one uint8 array (N, H, W, 3) per request."""
    job = batch[0].job
    pipe = runtime.pipeline_for(job.mode)
    pipe.scheduler = runtime.schedulers[job.scheduler]
    kwargs: dict[str, Any] = dict(
        _inputs(batch), num_inference_steps=job.steps, guidance_scale=job.guidance_scale,
        output_type="np", callback_on_step_end=lambda _pipe, step, _t, tensors: (on_step(step), tensors)[1],
    )
    if isinstance(job, Img2ImgJob):
        kwargs["strength"] = job.strength
    else:
        kwargs.update(width=job.width, height=job.height)
    with torch.inference_mode():
        images = _to_uint8(pipe(**kwargs).images)
    sizes = np.cumsum([len(request.seeds) for request in batch])[:-1]
    return list(np.split(images, sizes))
