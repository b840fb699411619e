"""Micro-batching: compatible jobs share one pipeline call and still match the same jobs run alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from devstack.services import WorkerProcess
from sdqueue import Img2ImgJob, SdQueue, Txt2ImgJob
from sdqueue_worker.generation import GenerationRequest, run_batch
from sdqueue_worker.runtime import load_runtime
from sdqueue_worker.settings import WorkerSettings as Settings
from tests.helpers import manifest_of, read_png, settings_from, smooth_image

FLUSH_WINDOW_MS = 3000  # long, so that a lone job delayed by it would show
TOLERANCE = 2 / 255  # batched matmuls may round differently; the noise and the picture are the same


@pytest.fixture(scope="module")
def runtime(tiny_model: str):  # type: ignore[no-untyped-def]
    return load_runtime(Settings(model=tiny_model, device="cpu"))


def request(job, seeds: list[int]) -> GenerationRequest:  # type: ignore[no-untyped-def]
    return GenerationRequest(job=job, job_id="t", seeds=seeds, deadline=time.monotonic() + 60)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde"])
def test_batched_images_match_the_same_jobs_alone(runtime, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    jobs = [Txt2ImgJob(prompt=p, width=64, height=64, steps=6, scheduler=scheduler) for p in ("a", "b", "c")]
    seeds = [[11], [12, 13], [14]]
    batched = run_batch(
        runtime, [request(j, s) for j, s in zip(jobs, seeds, strict=False)], lambda step: None
    )
    alone = [
        run_batch(runtime, [request(j, s)], lambda step: None)[0] for j, s in zip(jobs, seeds, strict=False)
    ]
    for together, single in zip(batched, alone, strict=False):
        assert together.shape == single.shape
        assert np.abs(together.astype(int) - single.astype(int)).max() / 255 <= TOLERANCE
    assert np.abs(alone[0].astype(int) - alone[2].astype(int)).mean() > 5, "different seeds differ"


def test_padding_to_a_bucket_changes_nothing(runtime) -> None:  # type: ignore[no-untyped-def]
    job = Txt2ImgJob(prompt="pad", width=64, height=64, steps=4)
    plain = run_batch(runtime, [request(job, [5])], lambda step: None)[0]
    padded = run_batch(runtime, [request(job, [5])], lambda step: None, pad_to=4)[0]
    assert padded.shape == plain.shape == (1, 64, 64, 3)
    assert np.abs(padded.astype(int) - plain.astype(int)).max() / 255 <= TOLERANCE


def test_batched_img2img_matches_alone(runtime) -> None:  # type: ignore[no-untyped-def]
    images = [smooth_image(1), smooth_image(2)]
    job = Img2ImgJob(prompt="x", image_url="s3://inputs/a.png", width=64, height=64, steps=10, strength=0.5)
    reqs = [request(job, [s]) for s in (3, 4)]
    for req, image in zip(reqs, images, strict=False):
        req.init_image = image
    batched = run_batch(runtime, reqs, lambda step: None)
    alone = [run_batch(runtime, [r], lambda step: None)[0] for r in reqs]
    for together, single in zip(batched, alone, strict=False):
        assert np.abs(together.astype(int) - single.astype(int)).max() / 255 <= TOLERANCE


@pytest.fixture(scope="module")
def batching_env(env: dict[str, str]) -> dict[str, str]:
    """Its own Redis database, so the shared worker never takes these jobs."""
    return {
        **env,
        "SDQ_REDIS_URL": env["SDQ_REDIS_URL"].rsplit("/", 1)[0] + "/3",
        "SDQ_MAX_BATCH": "4",
        "SDQ_FLUSH_WINDOW_MS": str(FLUSH_WINDOW_MS),
    }


@pytest.fixture(scope="module")
def batching_worker(logdir: Path, batching_env: dict[str, str]) -> Iterator[WorkerProcess]:
    process = WorkerProcess(logdir, batching_env, name="batching").start()
    yield process
    process.stop()


def test_worker_batches_compatible_queued_jobs(
    batching_worker, batching_env, queue: SdQueue, s3, worker
) -> None:  # type: ignore[no-untyped-def]
    """Jobs queued together run in shared pipeline calls; each image equals the same job run alone."""
    batching_queue = SdQueue(settings_from(batching_env))
    specs = [Txt2ImgJob(prompt=f"job {i}", width=64, height=64, steps=6, seed=100 + i) for i in range(8)]
    handles = [batching_queue.submit(spec, lane="bulk") for spec in specs]
    results = [h.wait(timeout=180) for h in handles]
    sizes = [manifest_of(s3, r)["worker"]["batch_images"] for r in results]
    print(f"batch sizes seen by 8 queued jobs with max_batch=4: {sizes}")
    batched = [(spec, r) for spec, r, size in zip(specs, results, sizes, strict=True) if size > 1][:3]
    assert batched, "compatible queued jobs must share a pipeline call"
    for spec, together in batched:  # only jobs that really ran in a shared call
        single = queue.submit(spec).wait(timeout=180)
        assert manifest_of(s3, single)["worker"]["batch_images"] == 1
        a = read_png(s3, "sdqueue", together.images[0].key)
        b = read_png(s3, "sdqueue", single.images[0].key)
        assert np.abs(a - b).max() <= TOLERANCE + 1e-6


def test_a_lone_job_is_not_delayed_by_the_flush_window(batching_worker, batching_env) -> None:  # type: ignore[no-untyped-def]
    """The GPU thread waits only while other jobs are being prepared: one job alone on a worker
    with a 3 s flush window starts at once (generate_s covers its wait for the GPU thread)."""
    batching_queue = SdQueue(settings_from(batching_env))
    batching_queue.submit(Txt2ImgJob(prompt="warm", width=64, height=64, steps=2)).wait(timeout=120)
    result = batching_queue.submit(Txt2ImgJob(prompt="alone", width=64, height=64, steps=2)).wait(timeout=120)
    waited = result.timings["generate_s"]
    print(f"a lone 2-step job: generate_s {waited:.2f}s with a {FLUSH_WINDOW_MS} ms flush window")
    assert waited < FLUSH_WINDOW_MS / 1000 / 2, f"the lone job waited for the flush window ({waited:.2f}s)"
