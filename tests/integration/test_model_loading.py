"""Model loading options on the tiny model: native-size defaults, fp16 weight variant, safety checker."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from sdqueue import JobValidationError, SdQueue, Txt2ImgJob
from sdqueue.errors import StartupError
from sdqueue_worker.defaults import native_side, with_model_size
from sdqueue_worker.runtime import load_runtime
from sdqueue_worker.settings import WorkerSettings
from tests.helpers import manifest_of, read_png


def test_omitted_sizes_take_the_models_native_side() -> None:
    job = Txt2ImgJob(prompt="p")
    assert (job.width, job.height) == (None, None)
    filled = with_model_size(job, 1024)
    assert (filled.width, filled.height) == (1024, 1024)
    assert with_model_size(Txt2ImgJob(prompt="p", width=768), 1024).height == 1024
    assert with_model_size(Txt2ImgJob(prompt="p", width=64, height=72), 1024) == Txt2ImgJob(
        prompt="p", width=64, height=72
    )
    with pytest.raises(JobValidationError, match="over the limit .* default side 1536"):
        with_model_size(Txt2ImgJob(prompt="p", width=2048), 1536)


def test_fp16_variant_loads_the_variant_files(tiny_model: str, tmp_path: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    pipe.save_pretrained(tmp_path / "variant", variant="fp16")
    weights = sorted(path.name for path in (tmp_path / "variant").rglob("*.safetensors"))
    assert weights and all(".fp16." in name for name in weights), weights
    runtime = load_runtime(
        WorkerSettings(model=str(tmp_path / "variant"), model_variant="fp16", device="cpu")
    )
    assert native_side(runtime.txt2img) == 64


def test_safety_checker_setting_is_wired(tiny_model: str) -> None:
    """Without a hub there is no model with a real checker here: this proves the setting is read
    and refuses a model without one (the flagging path runs only with a real checker)."""
    with pytest.raises(StartupError, match="SDQ_SAFETY_CHECKER is on but model .* has no safety_checker"):
        load_runtime(WorkerSettings(model=tiny_model, device="cpu", safety_checker=True))


@pytest.mark.usefixtures("worker")
def test_a_job_without_a_size_runs_at_the_native_size(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    result = queue.submit(Txt2ImgJob(prompt="a kite", steps=2, seed=2)).wait(timeout=180)
    assert (result.images[0].width, result.images[0].height) == (64, 64)
    assert read_png(s3, result.images[0].bucket, result.images[0].key).shape == (64, 64, 3)
    spec = manifest_of(s3, result)["spec"]
    assert (spec["width"], spec["height"]) == (64, 64)
