"""GPU-only checks, run on the GPU machine (``pytest -m gpu``); deselected in CI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.services import WorkerProcess
from sdqueue import JobFailed, SdQueue, Txt2ImgJob
from tests.helpers import manifest_of, settings_from

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_env(env: dict[str, str]) -> dict[str, str]:
    """A CUDA worker capped at 1.5% of the card (~1.2 GB on an 80 GB H100) on its own Redis db."""
    return {
        **env,
        "SDQ_DEVICE": "cuda",
        "SDQ_GPU_MEMORY_FRACTION": "0.015",
        "SDQ_REDIS_URL": env["SDQ_REDIS_URL"].rsplit("/", 1)[0] + "/7",
    }


@pytest.fixture(scope="module")
def gpu_worker(logdir: Path, gpu_env: dict[str, str]) -> Iterator[WorkerProcess]:
    process = WorkerProcess(logdir, gpu_env, name="gpu").start(timeout=300)
    yield process
    process.stop()


def test_cuda_worker_runs_bf16_with_shared_modules(gpu_worker, gpu_env, s3) -> None:  # type: ignore[no-untyped-def]
    queue = SdQueue(settings_from(gpu_env))
    result = queue.submit(Txt2ImgJob(prompt="gpu", width=64, height=64, steps=4, seed=1)).wait(timeout=120)
    manifest = manifest_of(s3, result)
    assert manifest["model"]["device"] == "cuda" and manifest["model"]["dtype"] == "bfloat16"
    assert manifest["model"]["fp8_unet"] is False  # FP8 is opt-in


def test_real_cuda_out_of_memory_fails_alone_and_the_worker_keeps_serving(gpu_worker, gpu_env) -> None:  # type: ignore[no-untyped-def]
    queue = SdQueue(settings_from(gpu_env))
    oversized = queue.submit(Txt2ImgJob(prompt="too big", width=2048, height=1024, steps=2, num_images=8))
    with pytest.raises(JobFailed) as info:
        oversized.wait(timeout=300)
    print(f"oversized job: {info.value.reason}")
    assert (
        "out of GPU memory" in info.value.reason and "lower width, height or num_images" in info.value.reason
    )
    after = queue.submit(Txt2ImgJob(prompt="fits", width=64, height=64, steps=4, seed=2)).wait(timeout=120)
    assert after.images and gpu_worker.alive()


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.sdxl import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", device="cuda", tiny=True)


def test_sdxl_worker_compiles_every_bucket_and_serves_a_batch(logdir, gpu_env, tiny_sdxl, s3) -> None:  # type: ignore[no-untyped-def]
    env = {
        **gpu_env,
        "SDQ_MODEL": str(tiny_sdxl),
        "SDQ_COMPILE": "1",
        "SDQ_COMPILE_BATCH_SIZES": "1,2",
        "SDQ_MAX_BATCH": "2",
        "SDQ_COMPILE_CACHE_DIR": str(logdir / "sdxl-inductor"),
        "SDQ_REDIS_URL": gpu_env["SDQ_REDIS_URL"].rsplit("/", 1)[0] + "/8",
    }
    worker = WorkerProcess(logdir, env, name="gpu-sdxl").start(timeout=900)
    try:
        queue = SdQueue(settings_from(env))
        handles = [
            queue.submit(Txt2ImgJob(prompt="xl", width=64, height=64, steps=4, seed=seed)) for seed in (1, 2)
        ]
        results = [handle.wait(timeout=300) for handle in handles]
        manifest = manifest_of(s3, results[0])
        assert manifest["model"]["dtype"] == "bfloat16" and all(r.images for r in results)
    finally:
        worker.stop()
