"""Progress, cancel and priority lanes against a real worker."""

from __future__ import annotations

import time

import pytest

from sdqueue import JobCancelled, SdQueue, Txt2ImgJob
from sdqueue.names import BULK_QUEUE

pytestmark = pytest.mark.usefixtures("worker")
LONG = dict(prompt="a long job", width=64, height=64, steps=150)


def wait_until(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def test_progress_is_reported_per_step_and_throttled(queue: SdQueue) -> None:
    handle = queue.submit(Txt2ImgJob(**LONG, seed=1))
    seen = set()
    while handle.state() in ("queued", "running"):
        progress = handle.progress()
        if progress:
            seen.add(progress["step"])
            assert progress["total"] == 150
        time.sleep(0.05)
    handle.wait(timeout=120)
    assert handle.progress()["step"] == 150
    print(f"distinct progress steps seen by the client: {len(seen)}")
    assert len(seen) >= 3, "progress must move while the job runs"
    assert len(seen) < 150, "progress writes are throttled, not one per step"


def test_cancel_a_running_job_stops_it_without_a_manifest(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    handle = queue.submit(Txt2ImgJob(**LONG, seed=2))
    wait_until(lambda: (handle.progress() or {}).get("step", 0) >= 2, 60, "the job starting")
    cancelled_at = time.monotonic()
    handle.cancel()
    with pytest.raises(JobCancelled):
        handle.wait(timeout=60)
    stopped_after = time.monotonic() - cancelled_at
    print(f"running job stopped {stopped_after:.2f}s after cancel, at step {handle.progress()['step']}/150")
    assert handle.state() == "cancelled"
    assert handle.progress()["step"] < 150
    listing = s3.list_objects_v2(Bucket="sdqueue", Prefix=f"outputs/{handle.job_id}/")
    assert listing.get("KeyCount", 0) == 0, "a cancelled job leaves no images and no manifest"
    assert queue.submit(Txt2ImgJob(prompt="next", width=64, height=64, steps=2)).wait(timeout=60).images


def test_cancel_a_queued_job_never_runs_it(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    blocker = queue.submit(Txt2ImgJob(**LONG, seed=3))
    queued = queue.submit(Txt2ImgJob(prompt="never", width=64, height=64, steps=2))
    queued.cancel()
    with pytest.raises(JobCancelled):
        queued.wait(timeout=120)
    blocker.cancel()
    assert queued.state() == "cancelled"
    assert queued.progress() is None, "a cancelled queued job never reaches a denoising step"
    assert s3.list_objects_v2(Bucket="sdqueue", Prefix=f"outputs/{queued.job_id}/").get("KeyCount", 0) == 0


def test_interactive_job_overtakes_a_thousand_bulk_jobs(queue: SdQueue) -> None:
    small = dict(prompt="bulk", width=64, height=64, steps=1)
    bulk = [queue.submit(Txt2ImgJob(**small), lane="bulk") for _ in range(1000)]
    wait_until(lambda: bulk[0].state() == "succeeded", 60, "bulk jobs flowing")
    job_time = bulk[0].wait(timeout=60).timings["total_s"]
    started = time.monotonic()
    result = queue.submit(Txt2ImgJob(**small, seed=9)).wait(timeout=60)
    latency = time.monotonic() - started
    waiting = queue.redis.llen(BULK_QUEUE)
    print(
        f"interactive job done {latency:.2f}s after submit behind {waiting} queued bulk jobs "
        f"(one bulk job takes {job_time:.2f}s; queue wait {result.timings['queue_wait_s']:.2f}s)"
    )
    queue.redis.delete(BULK_QUEUE)
    assert waiting > 500, "the bulk backlog was still there when the interactive job finished"
    assert result.timings["queue_wait_s"] < 2 * job_time + 0.5
