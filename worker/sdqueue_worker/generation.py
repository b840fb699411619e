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

from sdqueue.contract import AnyJob, Img2ImgJob, InpaintJob
from sdqueue_worker.prompts import batch_embeddings
from sdqueue_worker.runtime import Runtime
from sdqueue_worker.schedulers import seed_noise_sampler

ProgressFn = Callable[[int, int], None]


def _after_step(on_step: Callable[[int], None], step: int, tensors: dict[str, Any]) -> dict[str, Any]:
    """diffusers' ``callback_on_step_end``: report the step, hand the tensors back unchanged."""
    on_step(step)
    return tensors


@dataclass(eq=False)
class GenerationRequest:
    """One job's share of a batch, handed from a task thread to the GPU thread."""

    job: AnyJob
    job_id: str
    seeds: list[int]
    deadline: float
    lane_rank: int = 0
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    prompt_chunks: int = 1
    """75-token chunks the longer of the prompts needs (1: diffusers' own prompt encoding)."""
    on_progress: ProgressFn | None = None
    is_cancelled: Callable[[], bool] | None = None
    future: Future[Any] = field(default_factory=Future)
    batch_images: int = 0
    """Images in the pipeline call this job ran in (set by the GPU thread)."""
    pipeline: str = ""
    """Class name of the pipeline that was called for this job (set by ``run_batch``)."""
    nsfw: list[bool] | None = None
    """The safety checker's verdict per image (set by the GPU thread when the checker is on)."""

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one pipeline call."""
        job = self.job
        strength = job.strength if isinstance(job, Img2ImgJob) else None
        loras = tuple((lora.name, lora.scale) for lora in job.loras)
        return (
            job.mode,
            job.width,
            job.height,
            job.steps,
            job.guidance_scale,
            job.scheduler,
            strength,
            self.prompt_chunks,
            loras,
        )

    @property
    def total_steps(self) -> int:
        job = self.job
        if isinstance(job, Img2ImgJob):
            return min(int(job.steps * job.strength), job.steps)
        return job.steps

    def cancelled(self) -> bool:
        return bool(self.is_cancelled and self.is_cancelled())


def _rows(batch: list[GenerationRequest], pad_to: int) -> list[tuple[GenerationRequest, int]]:
    rows = [(request, seed) for request in batch for seed in request.seeds]
    return rows + [(batch[0], 0)] * max(0, pad_to - len(rows))


def _inputs(
    pipe: Any, batch: list[GenerationRequest], rows: list[tuple[GenerationRequest, int]]
) -> dict[str, Any]:
    texts = [(request.job.prompt, request.job.negative_prompt) for request, _ in rows]
    inputs: dict[str, Any] = {"generator": [torch.Generator("cpu").manual_seed(seed) for _, seed in rows]}
    if batch[0].prompt_chunks > 1:
        inputs.update(batch_embeddings(pipe, texts, batch[0].prompt_chunks))
    else:
        inputs.update(prompt=[p for p, _ in texts], negative_prompt=[n for _, n in texts])
    if batch[0].init_image is not None:
        inputs["image"] = [request.init_image for request, _ in rows]
    if batch[0].mask_image is not None:
        inputs["mask_image"] = [request.mask_image for request, _ in rows]
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
    rows = _rows(batch, pad_to)
    if runtime.loras is not None:
        runtime.loras.apply(job.loras)
    seed_noise_sampler(pipe.scheduler, [seed for _, seed in rows])
    kwargs: dict[str, Any] = dict(
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        output_type="pt",
        callback_on_step_end=lambda _pipe, step, _t, tensors: _after_step(on_step, step, tensors),
    )
    if isinstance(job, Img2ImgJob):
        kwargs["strength"] = job.strength
    if not isinstance(job, Img2ImgJob) or isinstance(job, InpaintJob):
        kwargs.update(width=job.width, height=job.height)
    for request in batch:
        request.pipeline = type(pipe).__name__
    with torch.inference_mode():
        kwargs.update(_inputs(pipe, batch, rows))
        images = _to_uint8(pipe(**kwargs).images)
    bounds = np.cumsum([len(request.seeds) for request in batch])
    per_request = list(np.split(images[: bounds[-1]], bounds[:-1]))
    if runtime.safety is not None:
        for request, pixels in zip(batch, per_request, strict=True):
            request.nsfw = runtime.safety.flags(pixels)
    return per_request
