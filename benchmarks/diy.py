"""The do-it-yourself baseline: the best plain diffusers loop a capable user writes by hand.

bf16 or fp16, ``torch.compile(mode="reduce-overhead")`` on the UNet, channels_last, fused QKV,
inductor's 1x1-convolution-as-matmul (diffusers' own speed-up guide), the Euler scheduler, images
returned as tensors (no encode, no upload), called in a plain loop at a fixed batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

PROMPT = "a photograph of an astronaut riding a horse"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], reps: int, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def load(model: str, dtype: torch.dtype, device: str) -> Any:
    from diffusers import AutoPipelineForText2Image, EulerDiscreteScheduler

    pipe = AutoPipelineForText2Image.from_pretrained(model, dtype=dtype, safety_checker=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def optimise(pipe: Any, compiled: bool) -> None:
    """What a capable user does by hand (GPU only)."""
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.fuse_qkv_projections()
    if compiled:
        compile_unet(pipe)


def compile_unet(pipe: Any, mode: str | None = "reduce-overhead") -> None:
    """The UNet compiled whole (``mode=None``: inductor without CUDA graphs), 1x1 convolutions as
    matrix products."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def call(pipe: Any, seeds: list[int], steps: int, size: int) -> torch.Tensor:
    """One pipeline call for ``len(seeds)`` images; [0, 1] NCHW tensors on the device."""
    with torch.inference_mode():
        images: torch.Tensor = pipe(
            [PROMPT] * len(seeds),
            negative_prompt=[""] * len(seeds),  # what the worker passes for a job's default
            num_inference_steps=steps,
            width=size,
            height=size,
            guidance_scale=7.5,
            generator=generators(seeds),
            output_type="pt",
        ).images
    return images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """The worker's own rounding (generation._to_uint8), NHWC on the host."""
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def images_per_s(pipe: Any, batch: int, steps: int, size: int, reps: int) -> float:
    seeds = list(range(batch))
    return batch / median_time(lambda: call(pipe, seeds, steps, size), reps)


def deviation(test: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and mean absolute difference (0-255 scale) of uint8 images against a reference."""
    diff = test.to(torch.float64) - reference.to(torch.float64)
    mse = float(diff.pow(2).mean())
    psnr = float("inf") if mse == 0 else 10 * float(torch.log10(torch.tensor(255.0**2 / mse)))
    return {"psnr_db": psnr, "mean_abs_diff": float(diff.abs().mean())}
