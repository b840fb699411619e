"""The model runtime: components loaded once per worker process, two pipelines over them.

img2img must not go through the txt2img pipeline: since diffusers 0.22 its ``__call__`` takes
``**kwargs`` and silently ignores ``image=``/``strength=``. The img2img pipeline is built from
the txt2img pipeline's own module objects (``AutoPipelineForImage2Image.from_pipe``, which does
not cast dtypes, unlike ``DiffusionPipeline.from_pipe`` without ``dtype=``, diffusers#12754), and
``check_shared`` proves at start-up that nothing was duplicated or cast. The inpainting pipeline
(``AutoPipelineForInpainting.from_pipe``) is built the same way and checked the same way; with a
4-channel UNet (SD 1.x base models, the tiny test model) diffusers runs it as masked img2img:
at every step the unmasked latents are reset to the noised input's.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline

from sdqueue.errors import StartupError
from sdqueue_worker.loading import load_pipeline
from sdqueue_worker.loras import LoraCache, LoraRegistry
from sdqueue_worker.safety import SafetyChecker
from sdqueue_worker.schedulers import build_schedulers
from sdqueue_worker.settings import WorkerSettings

log = logging.getLogger(__name__)
MIN_VERSIONS = {"diffusers": (0, 40), "transformers": (5, 6)}
"""Oldest versions that work (pyproject's floors): diffusers 0.40 for ``from_pretrained(dtype=...)``;
transformers 5.6 to load text encoders saved by current transformers (older 5.x releases load
them with random weights, without an error)."""
SHARED_MODULES = ("unet", "vae", "text_encoder", "tokenizer")
LOAD_COUNT = 0


@dataclass
class Runtime:
    """Everything the GPU thread needs, loaded once."""

    txt2img: DiffusionPipeline
    img2img: DiffusionPipeline
    inpaint: DiffusionPipeline
    schedulers: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    model_id: str
    load_seconds: float
    load_count: int
    warmup_seconds: float = 0.0
    attention: str = "default"
    """The SDPA backend put first (accel.optimise)."""
    fp8_layers: int = 0
    """UNet linear layers running in float8 (0: FP8 off)."""
    aot: list[Any] = field(default_factory=list)
    """The AOT package routers of the UNet and VAE decoder (sdqueue_worker.aot; empty when off)."""
    startup: dict[str, float] = field(default_factory=dict)
    """Seconds per start-up phase, in order (sdqueue_worker.startup)."""
    versions: dict[str, str] = field(default_factory=dict)
    loras: LoraCache | None = None
    """LoRA adapters (None when SDQ_LORA_DIR is unset)."""
    safety: SafetyChecker | None = None
    """The NSFW checker (None unless SDQ_SAFETY_CHECKER is on)."""

    def pipeline_for(self, mode: str) -> DiffusionPipeline:
        return {"img2img": self.img2img, "inpaint": self.inpaint}.get(mode, self.txt2img)


def pick_device(settings: WorkerSettings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def pick_dtype(settings: WorkerSettings, device: torch.device) -> torch.dtype:
    if settings.dtype != "auto":
        chosen: torch.dtype = getattr(torch, settings.dtype)
        return chosen
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def check_shared(txt2img: DiffusionPipeline, img2img: DiffusionPipeline, dtype: torch.dtype) -> None:
    """Fail start-up unless both pipelines use the very same modules, in the expected dtype."""
    kind = type(img2img).__name__
    for name in SHARED_MODULES:
        if getattr(txt2img, name) is not getattr(img2img, name):
            raise StartupError(f"{kind} does not share {name} with txt2img: VRAM would double")
    for name in ("unet", "vae", "text_encoder"):
        module_dtype = getattr(txt2img, name).dtype
        if module_dtype != dtype:
            raise StartupError(f"{name} is {module_dtype} after building {kind}, expected {dtype}")


def release(version: str) -> tuple[int, ...]:
    """(0, 40, 1) for "0.40.1.dev0": the leading numeric parts."""
    parts = []
    for part in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_versions(versions: dict[str, str]) -> None:
    """Refuse to start on a library older than sdqueue's floor, saying which and what to install."""
    for name, floor in MIN_VERSIONS.items():
        if name in versions and release(versions[name]) < floor:
            wanted = ".".join(map(str, floor))
            raise StartupError(
                f"{name} {versions[name]} is older than {wanted}, which the worker needs: "
                f'pip install "{name}>={wanted}" (or reinstall "sdqueue[worker]")'
            )


def library_versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def load_runtime(settings: WorkerSettings) -> Runtime:
    """Load the model components once and build both pipelines over them."""
    global LOAD_COUNT
    started = time.perf_counter()
    versions = library_versions()
    check_versions(versions)
    device = pick_device(settings)
    dtype = pick_dtype(settings, device)
    if device.type == "cuda" and settings.gpu_memory_fraction:
        torch.cuda.set_per_process_memory_fraction(settings.gpu_memory_fraction, torch.cuda.current_device())
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):  # an explicit setting wins
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    txt2img = load_pipeline(settings, dtype).to(device)
    txt2img.set_progress_bar_config(disable=True)
    img2img = AutoPipelineForImage2Image.from_pipe(txt2img)
    img2img.set_progress_bar_config(disable=True)
    check_shared(txt2img, img2img, dtype)
    inpaint = AutoPipelineForInpainting.from_pipe(txt2img)
    inpaint.set_progress_bar_config(disable=True)
    check_shared(txt2img, inpaint, dtype)
    LOAD_COUNT += 1
    runtime = Runtime(
        txt2img=txt2img,
        img2img=img2img,
        inpaint=inpaint,
        schedulers=build_schedulers(txt2img.scheduler),
        device=device,
        dtype=dtype,
        model_id=settings.model,
        load_seconds=time.perf_counter() - started,
        load_count=LOAD_COUNT,
        versions=versions,
    )
    if settings.safety_checker:
        runtime.safety = SafetyChecker.take_from([txt2img, img2img, inpaint])
    if settings.lora_dir:
        runtime.loras = LoraCache(txt2img, LoraRegistry(settings.lora_dir), settings.lora_cache_mb * 2**20)
    log.info("model %s loaded on %s/%s in %.1fs", settings.model, device, dtype, runtime.load_seconds)
    return runtime
