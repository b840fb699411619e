"""Progress, cancel and priority lanes against a real worker."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime

import pytest
import redis

from sdqueue import JobCancelled, SdQueue, Txt2ImgJob
from sdqueue.names import BULK_QUEUE, progress_key
from tests.helpers import assert_no_outputs, assert_progress_stopped, backend_meta, wait_cancelled_by_worker

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


class ProgressWrites:
    """Counts the worker's progress writes for one job on the Redis server itself (MONITOR)."""

    def __init__(self, queue: SdQueue, job_id: str) -> None:
        self.target = f"SET {progress_key(job_id)} "
        self.count = 0
        self._stop = threading.Event()
        self._monitor = redis.Redis.from_url(queue.settings.redis_url.get_secret_value()).monitor()
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            command = self._monitor.next_command()["command"]
            self.count += command.startswith(self.target)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=30)  # the worker's heartbeats keep MONITOR talking
        return self.count


def test_progress_is_reported_per_step_and_throttled(queue: SdQueue) -> None:
    spec = Txt2ImgJob(**LONG, seed=1, job_id=f"throttle-{uuid.uuid4().hex[:8]}")
    writes = ProgressWrites(queue, spec.job_id or "")
    try:
        handle = queue.submit(spec)
        seen = set()
        while handle.state() in ("queued", "running"):
            progress = handle.progress()
            if progress:
                seen.add(progress["step"])
                assert progress["total"] == 150
            time.sleep(0.05)
        result = handle.wait(timeout=120)
    finally:
        count = writes.stop()
    assert handle.progress()["step"] == 150
    interval = 0.25  # WorkerSettings.progress_interval_s, the session worker's default
    allowed = result.timings["generate_s"] / interval + 2
    print(
        f"{count} progress writes in {result.timings['generate_s']:.1f}s (at most {allowed:.0f}); client saw {len(seen)}"
    )
    assert len(seen) >= 3, "progress must move while the job runs"
    assert 3 <= count <= allowed, "progress writes are throttled to one per interval, not one per step"


def test_cancel_a_running_job_stops_it_without_a_manifest(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    handle = queue.submit(Txt2ImgJob(**LONG, seed=2))
    wait_until(lambda: (handle.progress() or {}).get("step", 0) >= 2, 60, "the job starting")
    cancelled_at = time.monotonic()
    handle.cancel()
    with pytest.raises(JobCancelled):
        handle.wait(timeout=60)
    stopped_after = time.monotonic() - cancelled_at
    wait_cancelled_by_worker(queue, handle.job_id, timeout=5)
    step = assert_progress_stopped(queue, handle.job_id, total=150)
    print(f"running job stopped {stopped_after:.2f}s after cancel, at step {step}/150")
    assert_no_outputs(s3, handle.job_id)
    assert queue.submit(Txt2ImgJob(prompt="next", width=64, height=64, steps=2)).wait(timeout=60).images


def test_cancel_a_queued_job_never_runs_it(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    blocker = queue.submit(Txt2ImgJob(**LONG, seed=3))
    queued = queue.submit(Txt2ImgJob(prompt="never", width=64, height=64, steps=2))
    queued.cancel()
    with pytest.raises(JobCancelled):
        queued.wait(timeout=120)
    blocker.cancel()
    assert (backend_meta(queue, queued.job_id) or {}).get("status") in ("FAILURE", "REVOKED")
    assert queued.progress() is None, "a cancelled queued job never reaches a denoising step"
    assert s3.list_objects_v2(Bucket="sdqueue", Prefix=f"outputs/{queued.job_id}/").get("KeyCount", 0) == 0


def test_interactive_job_overtakes_a_thousand_bulk_jobs(queue: SdQueue) -> None:
    """Judged by order, not by seconds: few bulk jobs may finish while the interactive one waits."""
    small = dict(prompt="bulk", width=64, height=64, steps=1)
    try:
        bulk = [queue.submit(Txt2ImgJob(**small), lane="bulk") for _ in range(1000)]
        wait_until(lambda: bulk[0].state() == "succeeded", 60, "bulk jobs flowing")
        submitted = time.time()
        result = queue.submit(Txt2ImgJob(**small, seed=9)).wait(timeout=60)
        finished = time.time()
        waiting = queue.redis.llen(BULK_QUEUE)
    finally:  # never leave a backlog on the shared worker
        queue.redis.delete(BULK_QUEUE)
    metas = queue.redis.mget([f"celery-task-meta-{h.job_id}" for h in bulk])
    finals = [json.loads(m) for m in metas if m]
    done_at = [datetime.fromisoformat(f["date_done"]).timestamp() for f in finals if f["status"] == "SUCCESS"]
    overtaken_by = sum(submitted <= at <= finished for at in done_at)
    print(
        f"interactive job done behind {waiting} queued bulk jobs; {overtaken_by} bulk jobs finished "
        f"while it was in the system (queue wait {result.timings['queue_wait_s']:.2f}s)"
    )
    assert waiting > 0, "the bulk backlog was gone before the interactive job finished"
    assert overtaken_by <= 8, "the interactive job waited behind the bulk backlog"
