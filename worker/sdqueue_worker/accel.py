"""GPU speed-ups: channels_last, fused QKV, the fastest attention backend, opt-in FP8, torch.compile
with CUDA graphs for the UNet (and without them for the VAE decoder), batch buckets, and AOT
packages of both per bucket for warm starts (sdqueue_worker.aot).

All optional and off on CPU. CUDA graphs need static shapes, so with compile on a batch is padded
up to the next bucket size (``compile_batch_sizes``), and every bucket is compiled at start-up,
before the worker takes jobs. The inductor caches live in ``compile_cache_dir`` so a restart
reuses them. Warm-up runs on the GPU thread itself: CUDA graphs belong to the thread that
recorded them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from sdqueue_worker import attention
from sdqueue_worker.aot import AotForward, check_aot_supported
from sdqueue_worker.fp8 import check_fp8_supported, quantize_unet_fp8
from sdqueue_worker.runtime import Runtime
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.startup import timed

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
    latent = default_size(runtime) // pipe.vae_scale_factor
    batch = 2 * max(settings.compile_batch_sizes or [1])  # classifier-free guidance doubles the batch
    with timed(runtime.startup, "attention_probe_s"):
        runtime.attention = attention.choose(
            settings.attention, pipe.unet.config, batch, (latent, latent), runtime.dtype
        )
    if settings.fp8:
        check_fp8_supported(runtime.device, runtime.dtype, loras=runtime.loras is not None)
        runtime.fp8_layers = quantize_unet_fp8(pipe.unet)
        log.info("FP8: %d UNet linear layers and 1x1 convolutions in float8", runtime.fp8_layers)
    if use_compile(settings, runtime):
        configure_cache(settings.compile_cache_dir)
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        if runtime.loras is not None:
            runtime.loras.prepare_hotswap(settings.lora_max_rank)
        if settings.aot:
            check_aot_supported(loras=runtime.loras is not None)
        aot = aot_directory(settings) if settings.aot else None
        routers = [compile_unet(pipe.unet, aot)]
        if settings.compile_vae:
            routers.append(compile_vae_decoder(pipe.vae, aot))
        runtime.aot = [router for router in routers if router is not None]


def aot_directory(settings: WorkerSettings) -> Path:
    """Where AOT packages live: beside the inductor cache (a temporary folder without one)."""
    base = settings.compile_cache_dir or os.path.join(tempfile.gettempdir(), "sdqueue-compile")
    return Path(base) / "aot"


def compile_vae_decoder(vae: torch.nn.Module, aot: Path | None = None) -> AotForward | None:
    """Compile the VAE decoder without CUDA graphs: it runs once per batch, and inductor fuses its
    GroupNorm + SiLU pairs, which dominate its memory traffic at 512-1024 px. With ``aot``, the
    signatures warm-up sees run from AOT packages kept there."""
    decoder: torch.nn.Module = vae.decoder  # type: ignore[assignment]
    compiled = torch.compile(decoder.forward)
    router = AotForward(decoder, compiled, aot, "vae-decoder") if aot else None
    decoder.forward = router or compiled
    return router


def compile_unet(unet: torch.nn.Module, aot: Path | None = None) -> AotForward | None:
    """Compile the UNet's forward with CUDA graphs, in place (both pipelines hold this object).
    With ``aot``, the signatures warm-up sees run from AOT packages kept there instead.

    Schedulers hand the UNet timesteps of different dtypes (PNDM int64, Euler float32); a new
    dtype would recompile for minutes mid-job, so the timestep is cast before the compiled call.
    """
    compiled = torch.compile(unet.forward, mode="reduce-overhead", fullgraph=True)
    router = AotForward(unet, compiled, aot, "unet") if aot else None
    target = router or compiled

    def forward(
        sample: torch.Tensor, timestep: torch.Tensor | float | int, *args: object, **kwargs: object
    ) -> object:
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32)
        return target(sample, timestep, *args, **kwargs)

    unet.forward = forward
    return router


def bucket_for(images: int, buckets: list[int]) -> int:
    """The smallest compiled batch size that holds ``images`` (or ``images`` itself)."""
    fitting = [size for size in sorted(buckets) if size >= images]
    return fitting[0] if fitting else images


def default_size(runtime: Runtime) -> int:
    pipe = runtime.txt2img
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def warm_up(runtime: Runtime, settings: WorkerSettings) -> float:
    """Run each batch bucket once at the model's native size (compiles when compile is on).

    Each bucket gets a graph specialised to its own static shape (dynamo would otherwise turn the
    batch dimension dynamic at the second bucket: slower to compile, and its kernels are
    generic). A size seen only later still gets one dynamic graph that serves all such sizes.
    If the compiled graphs fail with the attention backend the probe chose, the worker falls back
    to PyTorch's own choice and compiles again rather than failing to start.
    """
    import torch._dynamo

    started = time.perf_counter()
    try:
        _run_buckets(runtime, settings, started)
    except Exception:
        if runtime.attention in ("default", "flash") or runtime.device.type != "cuda":
            raise
        log.exception(
            "warm-up failed with attention backend %s; retrying with the default", runtime.attention
        )
        attention.reset()
        runtime.attention = "default"
        torch._dynamo.reset()
        _run_buckets(runtime, settings, started)
    for router in runtime.aot:
        router.freeze()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _run_buckets(runtime: Runtime, settings: WorkerSettings, started: float) -> None:
    import torch._dynamo

    size = default_size(runtime)
    buckets = settings.compile_batch_sizes if use_compile(settings, runtime) else [1]
    for batch in sorted(set(buckets)):
        with (
            timed(runtime.startup, f"warmup_batch_{batch}_s"),
            torch.inference_mode(),
            torch._dynamo.config.patch(automatic_dynamic_shapes=False),
        ):
            runtime.txt2img(
                ["warm-up"] * batch, num_inference_steps=2, width=size, height=size, output_type="pt"
            )
        log.info("warmed batch %d at %dx%d (%.1fs so far)", batch, size, size, time.perf_counter() - started)
