"""Load the txt2img pipeline the way the settings say: hub id or folder, fp16 weight variant,
single-file checkpoint, optional safety checker.

* ``SDQ_MODEL_VARIANT=fp16`` loads ``*.fp16.safetensors`` weights (half the download and disk).
* ``SDQ_MODEL`` naming a ``.safetensors``/``.ckpt`` file loads it with ``from_single_file``:
  SDXL when the checkpoint has a second text encoder (``conditioner.embedders.1``), else SD 1.x/2.x.
  Offline, give ``SDQ_SINGLE_FILE_CONFIG``: a diffusers folder (or hub id) whose configs describe it.
* ``SDQ_SAFETY_CHECKER=true`` keeps the model's own ``safety_checker``: it is taken off the
  pipelines (which would black out flagged images) and run by the worker on each output, whose
  verdict goes into the result and manifest (``nsfw`` per image); the image is kept as generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from sdqueue.errors import StartupError
from sdqueue_worker.settings import WorkerSettings

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
SDXL_KEY = "conditioner.embedders.1"


def is_single_file(model: str) -> bool:
    return model.endswith(SINGLE_FILE_SUFFIXES) and Path(model).is_file()


def single_file_class(path: str) -> Any:
    """The pipeline class of a single-file checkpoint, from its tensor names."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as handle:
            if any(key.startswith(SDXL_KEY) for key in handle.keys()):
                return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def load_pipeline(settings: WorkerSettings, dtype: torch.dtype) -> Any:
    """The txt2img pipeline on the CPU, in ``dtype``; the caller moves it to the device."""
    safety: dict[str, Any] = {} if settings.safety_checker else {"safety_checker": None}
    if is_single_file(settings.model):
        options = {"config": settings.single_file_config} if settings.single_file_config else {}
        pipe = single_file_class(settings.model).from_single_file(
            settings.model, torch_dtype=dtype, **options, **safety
        )
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(
            settings.model,
            dtype=dtype,
            revision=settings.model_revision,
            variant=settings.model_variant,
            requires_safety_checker=False,
            **safety,
        )
    if settings.safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise StartupError(
            f"SDQ_SAFETY_CHECKER is on but model {settings.model} has no safety_checker; "
            "use a model that ships one or turn the setting off"
        )
    return pipe
