"""GPU speed-ups: channels_last, fused QKV, torch.compile with CUDA graphs, batch buckets.

All optional and off on CPU. CUDA graphs need static shapes, so with compile on a batch is padded
up to the next bucket size (``compile_batch_sizes``), and every bucket is compiled at start-up,
before the worker takes jobs. The inductor caches live in ``compile_cache_dir`` so a restart
reuses them. Warm-up runs on the GPU thread itself: CUDA graphs belong to the thread that
recorded them.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from sdqueue_worker.runtime import Runtime
from sdqueue_worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def use_compile(settings: WorkerSettings, runtime: Runtime) -> bool:
    return settings.compile and runtime.device.type == "cuda"


def configure_cache(cache_dir: str | None) -> None:
    """Persistent inductor/Triton caches: set before the first compile."""
    if cache_dir:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache_dir, "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def optimise(runtime: Runtime, settings: WorkerSettings) -> None:
    """In-place module changes shared by both pipelines (they hold the same objects)."""
    if runtime.device.type != "cuda":
        return
    pipe = runtime.txt2img
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if runtime.loras is None:  # fused QKV would bypass LoRA layers on to_q/to_k/to_v
        pipe.fuse_qkv_projections()
    if use_compile(settings, runtime):
        configure_cache(settings.compile_cache_dir)
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        if runtime.loras is not None:
            runtime.loras.prepare_hotswap(settings.lora_max_rank)
        compile_unet(pipe.unet)


def compile_unet(unet: torch.nn.Module) -> None:
    """Compile the UNet's forward with CUDA graphs, in place (both pipelines hold this object).

    Schedulers hand the UNet timesteps of different dtypes (PNDM int64, Euler float32); a new
    dtype would recompile for minutes mid-job, so the timestep is cast before the compiled call.
    """
    compiled = torch.compile(unet.forward, mode="reduce-overhead", fullgraph=True)

    def forward(
        sample: torch.Tensor, timestep: torch.Tensor | float | int, *args: object, **kwargs: object
    ) -> object:
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32)
        return compiled(sample, timestep, *args, **kwargs)

    unet.forward = forward


def bucket_for(images: int, buckets: list[int]) -> int:
    """The smallest compiled batch size that holds ``images`` (or ``images`` itself)."""
    fitting = [size for size in sorted(buckets) if size >= images]
    return fitting[0] if fitting else images


def default_size(runtime: Runtime) -> int:
    pipe = runtime.txt2img
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def warm_up(runtime: Runtime, settings: WorkerSettings) -> float:
    """Run each batch bucket once at the model's native size (compiles when compile is on)."""
    started = time.perf_counter()
    size = default_size(runtime)
    buckets = settings.compile_batch_sizes if use_compile(settings, runtime) else [1]
    for batch in sorted(set(buckets)):
        with torch.inference_mode():
            runtime.txt2img(
                ["warm-up"] * batch, num_inference_steps=2, width=size, height=size, output_type="pt"
            )
        log.info("warmed batch %d at %dx%d (%.1fs so far)", batch, size, size, time.perf_counter() - started)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started
