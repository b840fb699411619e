"""LoRA adapters per job on the tiny model (CPU): registry checks, cache, scales, hot-swap mode."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import save_file

from sdqueue import JobValidationError, Txt2ImgJob, parse_job
from sdqueue_worker.generation import GenerationRequest, run_batch
from sdqueue_worker.loras import LoraRegistry
from sdqueue_worker.runtime import load_runtime
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.tiny_lora import build_tiny_lora


@pytest.fixture(scope="module")
def lora_dir(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    build_tiny_lora(tiny_model, folder, "ink", seed=1)
    build_tiny_lora(tiny_model, folder, "sun", seed=2)
    (folder / "broken.safetensors").write_bytes(b"\x00" * 40)
    save_file({"unet.weight": __import__("torch").zeros(2)}, str(folder / "plain.safetensors"))
    return folder


@pytest.fixture(scope="module")
def runtime(tiny_model: str, lora_dir: Path):  # type: ignore[no-untyped-def]
    return load_runtime(WorkerSettings(model=tiny_model, device="cpu", lora_dir=str(lora_dir)))


def request(**fields: Any) -> GenerationRequest:
    job = Txt2ImgJob(prompt="a lighthouse", width=64, height=64, steps=3, **fields)
    return GenerationRequest(job=job, job_id="t", seeds=[7], deadline=time.monotonic() + 120)


def image(runtime, **fields: Any) -> np.ndarray:  # type: ignore[no-untyped-def]
    return run_batch(runtime, [request(**fields)], lambda step: None)[0].astype(int)


def test_scale_zero_equals_no_adapter_and_adapters_differ(runtime) -> None:  # type: ignore[no-untyped-def]
    base = image(runtime)
    zero = image(runtime, loras=[{"name": "ink", "scale": 0.0}])
    ink = image(runtime, loras=[{"name": "ink", "scale": 1.0}])
    sun = image(runtime, loras=[{"name": "sun", "scale": 1.0}])
    both = image(runtime, loras=[{"name": "ink", "scale": 0.5}, {"name": "sun", "scale": 0.5}])
    after = image(runtime)
    print(
        f"LoRA effect: ink vs base {np.abs(ink - base).mean():.1f}/255, ink vs sun {np.abs(ink - sun).mean():.1f}"
    )
    assert np.abs(zero - base).max() == 0, "scale 0 is exactly the base model"
    assert np.abs(ink - base).mean() > 3 and np.abs(ink - sun).mean() > 3
    assert np.abs(both - ink).mean() > 1 and np.abs(both - sun).mean() > 1
    assert np.abs(after - base).max() == 0, "a job without adapters runs with LoRA off"
    assert runtime.loras.loads == 2, "each adapter is loaded once and then cached"


def test_adapter_set_and_scales_are_in_the_batch_key() -> None:
    keys = {
        request(loras=[{"name": "ink", "scale": 1.0}]).batch_key,
        request(loras=[{"name": "ink", "scale": 0.5}]).batch_key,
        request(loras=[{"name": "sun", "scale": 1.0}]).batch_key,
        request().batch_key,
    }
    assert len(keys) == 4
    assert (
        request(loras=[{"name": "ink"}]).batch_key == request(loras=[{"name": "ink", "scale": 1.0}]).batch_key
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "unknown adapter 'missing'; this worker has: broken, ink, plain, sun"),
        ("broken", "'broken' is not a readable safetensors file"),
        ("plain", "'plain' holds no LoRA weights"),
    ],
)
def test_unknown_or_bad_adapters_are_clear_errors(lora_dir: Path, name: str, message: str) -> None:
    with pytest.raises(JobValidationError, match=message):
        LoraRegistry(str(lora_dir)).path_for(name)


def test_no_lora_folder_refuses_adapters_and_names_cannot_be_paths() -> None:
    with pytest.raises(JobValidationError, match="SDQ_LORA_DIR is not set"):
        LoraRegistry(None).path_for("ink")
    for name in ("../ink", "/etc/passwd", "a/b", "https://example.com/x"):
        with pytest.raises(JobValidationError, match="loras.0.name"):
            parse_job({"mode": "txt2img", "prompt": "p", "loras": [{"name": name}]})


def test_eviction_keeps_the_cache_under_its_limit(tiny_model: str, lora_dir: Path) -> None:
    runtime = load_runtime(
        WorkerSettings(model=tiny_model, device="cpu", lora_dir=str(lora_dir), lora_cache_mb=1)
    )
    one = (lora_dir / "ink.safetensors").stat().st_size
    runtime.loras.max_bytes = one + one // 2  # room for one adapter
    first = image(runtime, loras=[{"name": "ink", "scale": 1.0}])
    image(runtime, loras=[{"name": "sun", "scale": 1.0}])
    assert list(runtime.loras.loaded) == ["sun"]
    assert np.abs(image(runtime, loras=[{"name": "ink", "scale": 1.0}]) - first).max() == 0
    assert runtime.loras.loads == 3


def test_hot_swap_mode_gives_the_same_images(tiny_model: str, lora_dir: Path, runtime) -> None:  # type: ignore[no-untyped-def]
    """The compiled-UNet path (one slot, weights swapped in place, scale folded in), here uncompiled."""
    hot = load_runtime(WorkerSettings(model=tiny_model, device="cpu", lora_dir=str(lora_dir)))
    hot.loras.prepare_hotswap(max_rank=8)
    for fields in ({}, {"loras": [{"name": "ink", "scale": 0.7}]}, {"loras": [{"name": "sun"}]}, {}):
        assert np.abs(image(hot, **fields) - image(runtime, **fields)).max() <= 1, fields
    with pytest.raises(JobValidationError, match="may use one adapter"):
        hot.loras.apply(request(loras=[{"name": "ink"}, {"name": "sun"}]).job.loras)
