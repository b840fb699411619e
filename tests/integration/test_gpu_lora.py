"""LoRA hot-swap on a compiled UNet (GPU only): changing adapters and scales never recompiles."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from sdqueue import Txt2ImgJob
from sdqueue_worker.accel import optimise, warm_up
from sdqueue_worker.generation import GenerationRequest, run_batch
from sdqueue_worker.runtime import load_runtime
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.tiny_lora import build_tiny_lora

pytestmark = pytest.mark.gpu


def test_adapter_changes_do_not_recompile_a_compiled_unet(tiny_model: str, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for seed, name in enumerate(("ink", "sun"), start=1):
        build_tiny_lora(tiny_model, tmp_path, name, seed=seed)
    settings = WorkerSettings(
        model=tiny_model,
        device="cuda",
        compile=True,
        compile_batch_sizes=[1],
        lora_dir=str(tmp_path),
        lora_max_rank=8,
    )
    runtime = load_runtime(settings)
    optimise(runtime, settings)
    size = 64
    warm_up(runtime, settings)

    def run(loras: list[dict[str, object]]) -> None:
        job = Txt2ImgJob(prompt="p", width=size, height=size, steps=3, loras=loras)
        request = GenerationRequest(job=job, job_id="g", seeds=[1], deadline=time.monotonic() + 600)
        run_batch(runtime, [request], lambda step: None)

    run([])  # the job shape of the loop below, compiled once
    torch._dynamo.config.error_on_recompile = True
    try:
        for loras in (
            [{"name": "ink"}],
            [{"name": "ink", "scale": 0.3}],
            [{"name": "sun"}],
            [],
            [{"name": "ink"}],
        ):
            run(loras)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert runtime.loras is not None and runtime.loras.hot == ("ink", 1.0)
