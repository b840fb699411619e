"""The GPU executor in-process, driven by FakeGenerate: no model, no services, a few seconds."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import pytest

from sdqueue.contract import Img2ImgJob, Txt2ImgJob
from sdqueue.errors import GenerationError, JobCancelled, StartupError
from sdqueue_worker.executor import ExecutorState, GpuExecutor, JobInterrupted, job_slots
from sdqueue_worker.generation import GenerationRequest
from sdqueue_worker.testing import FakeGenerate

WAIT_S = 20.0
"""Upper bound for anything to happen on a loaded CI machine; tests normally take milliseconds."""
LOGGER = "sdqueue_worker.executor"


def executor_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The executor's own records: caplog also catches other threads of the test process (a Celery
    result consumer left by an earlier test logs its lost Redis)."""
    return [record for record in caplog.records if record.name == LOGGER]


# A GPU or watchdog thread that dies of an exception fails the test that started it.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def request(
    job_id: str,
    lane_rank: int = 0,
    images: int = 1,
    steps: int = 2,
    width: int = 64,
    deadline_s: float = 60.0,
    cancelled: threading.Event | None = None,
) -> GenerationRequest:
    job = Txt2ImgJob(prompt=job_id, width=width, height=64, steps=steps, num_images=images)
    return GenerationRequest(
        job=job,
        job_id=job_id,
        seeds=list(range(images)),
        deadline=time.monotonic() + deadline_s,
        lane_rank=lane_rank,
        is_cancelled=cancelled.is_set if cancelled else None,
    )


@contextmanager
def running(
    fake: FakeGenerate, max_batch: int = 1, flush_window_s: float = 0.0, **kw: Any
) -> Iterator[GpuExecutor]:
    executor = GpuExecutor(fake, max_batch, flush_window_s, time_limit_s=kw.pop("time_limit_s", 60.0), **kw)
    try:
        yield executor
    finally:
        fake.release.set()
        executor.stop()


def outcome(req: GenerationRequest) -> Any:
    return req.future.result(timeout=WAIT_S)


def error_of(req: GenerationRequest) -> BaseException | None:
    future: Future[Any] = req.future
    return future.exception(timeout=WAIT_S)


def gpu_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("sdq-gpu")}


def test_states_and_slots() -> None:
    before = gpu_threads()  # an earlier test's threads may still be winding down
    fake = FakeGenerate()
    executor = GpuExecutor(fake, max_batch=4, flush_window_s=0.0, time_limit_s=10.0)
    assert executor.state is ExecutorState.NEW
    assert gpu_threads() <= before, "no thread before start()"
    assert executor.slots == job_slots(4) == 8 and job_slots(1) == 1 and job_slots(2) == 4
    assert executor.hard_limit_s == 10.0 + 60.0  # the default grace (SDQ_HARD_LIMIT_GRACE_S)
    executor.start()
    assert executor.state is ExecutorState.READY
    ours = gpu_threads() - before
    assert sorted(thread.name for thread in ours) == ["sdq-gpu", "sdq-gpu-watchdog"]
    assert all(thread.daemon for thread in ours), "they must never keep a dying worker alive"
    with pytest.raises(StartupError, match=r"^the GPU executor was already started \(state READY\)$"):
        executor.start()
    executor.stop()
    assert executor.state is ExecutorState.DEFUNCT
    assert not [thread for thread in ours if thread.is_alive()], "stop() returns once both ended"
    late = executor.submit(request("late"))
    error = error_of(late)
    assert isinstance(error, GenerationError) and str(error) == "the GPU executor is not running"
    assert fake.job_ids == []


def test_stop_during_prepare_never_becomes_ready() -> None:
    preparing, release = threading.Event(), threading.Event()

    def prepare() -> None:
        preparing.set()
        release.wait(WAIT_S)

    executor = GpuExecutor(FakeGenerate(), 1, 0.0, 10.0, prepare=prepare)
    starting = threading.Thread(target=executor.start)
    starting.start()
    assert preparing.wait(WAIT_S)
    executor.stop(timeout_s=0.05)  # the GPU thread is still in prepare
    release.set()
    starting.join(WAIT_S)
    executor.stop()
    assert executor.state is ExecutorState.DEFUNCT
    assert isinstance(error_of(executor.submit(request("late"))), GenerationError)


def test_failed_prepare_is_a_startup_error() -> None:
    def prepare() -> None:
        raise ValueError("no such GPU")

    executor = GpuExecutor(FakeGenerate(), 1, 0.0, 10.0, prepare=prepare)
    with pytest.raises(StartupError, match=r"^GPU thread start-up failed: no such GPU$") as raised:
        executor.start()
    assert isinstance(raised.value.__cause__, ValueError)
    assert executor.state is ExecutorState.DEFUNCT
    assert isinstance(error_of(executor.submit(request("late"))), GenerationError)
    executor.stop()


def test_interactive_before_bulk_then_arrival() -> None:
    fake = FakeGenerate()
    with running(fake) as executor:
        reqs = [
            executor.submit(request(name, lane_rank=rank))
            for name, rank in (("b1", 1), ("i1", 0), ("b2", 1), ("i2", 0), ("i3", 0))
        ]
        executor.start()
        for req in reqs:
            outcome(req)
    assert fake.job_ids == [["i1"], ["i2"], ["i3"], ["b1"], ["b2"]]


def test_new_interactive_job_overtakes_queued_bulk() -> None:
    fake = FakeGenerate(hang_when=lambda batch: batch[0].job_id == "first")
    with running(fake) as executor:
        executor.start()
        first = executor.submit(request("first", lane_rank=1))
        assert fake.started.wait(WAIT_S)
        bulk = executor.submit(request("bulk", lane_rank=1))
        urgent = executor.submit(request("urgent", lane_rank=0))
        fake.release.set()
        for req in (first, bulk, urgent):
            outcome(req)
    assert fake.job_ids == [["first"], ["urgent"], ["bulk"]]


def test_compatible_jobs_share_a_call_up_to_max_batch() -> None:
    fake = FakeGenerate()
    with running(fake, max_batch=4) as executor:
        reqs = [
            executor.submit(request("a", images=1)),
            executor.submit(request("wide", width=128)),  # other size: other batch_key
            executor.submit(request("b", images=2)),
            executor.submit(request("c", images=2)),  # would make 5 images
            executor.submit(request("d", images=1)),
        ]
        executor.start()
        pixels = [outcome(req) for req in reqs]
        assert executor.batches_run == 3
    assert fake.job_ids == [["a", "b", "d"], ["wide"], ["c"]]
    assert fake.pad_to == [0, 0, 0], "no buckets: no padding"
    assert [req.batch_images for req in reqs] == [4, 1, 4, 2, 4]
    assert [p.shape for p in pixels] == [
        (1, 64, 64, 3),
        (1, 64, 128, 3),
        (2, 64, 64, 3),
        (2, 64, 64, 3),
        (1, 64, 64, 3),
    ]


def test_img2img_and_txt2img_never_share_a_call() -> None:
    fake = FakeGenerate()
    with running(fake, max_batch=4) as executor:
        img = Img2ImgJob(
            prompt="p", image_url="s3://inputs/a.png", width=64, height=64, steps=4, strength=0.5
        )
        reqs = [
            executor.submit(request("t")),
            executor.submit(
                GenerationRequest(job=img, job_id="i", seeds=[0], deadline=time.monotonic() + 60)
            ),
        ]
        executor.start()
        for req in reqs:
            outcome(req)
    assert fake.job_ids == [["t"], ["i"]]
    assert fake.steps_run == 2 + 2  # img2img runs steps * strength, like the real pipeline


def test_buckets_pad_the_call() -> None:
    fake = FakeGenerate()
    with running(fake, max_batch=4, buckets=[1, 4]) as executor:
        reqs = [executor.submit(request("a")), executor.submit(request("b"))]
        executor.start()
        for req in reqs:
            outcome(req)
    assert fake.pad_to == [4]


def test_lone_job_is_not_delayed_by_the_flush_window() -> None:
    fake = FakeGenerate()
    window = 5.0
    with running(fake, max_batch=4, flush_window_s=window) as executor:
        executor.start()
        began = time.monotonic()
        with executor.preparing():  # as JobRunner does: submit inside its own preparing block
            req = executor.submit(request("alone"))
        outcome(req)
        assert time.monotonic() - began < window / 2
    assert fake.job_ids == [["alone"]]


def test_flush_window_waits_for_a_job_still_preparing() -> None:
    fake = FakeGenerate()
    with running(fake, max_batch=4, flush_window_s=WAIT_S) as executor:
        executor.start()
        with executor.preparing():  # another task thread, still downloading its input
            with executor.preparing():
                first = executor.submit(request("first"))
            time.sleep(0.2)  # the GPU thread has the first job and waits in the window meanwhile
            second = executor.submit(request("second"))
        outcome(first)
        outcome(second)
    assert fake.job_ids == [["first", "second"]]


def test_flush_window_never_waits_past_the_window() -> None:
    fake = FakeGenerate()
    window = 0.3
    with running(fake, max_batch=4, flush_window_s=window) as executor:
        executor.start()
        with executor.preparing():  # another task thread, stuck preparing while we wait
            began = time.monotonic()
            with executor.preparing():
                req = executor.submit(request("first"))
            outcome(req)
            waited = time.monotonic() - began
    assert window * 0.9 <= waited < window + WAIT_S / 2
    assert fake.job_ids == [["first"]]


def test_cancel_before_start_never_reaches_the_gpu() -> None:
    fake = FakeGenerate()
    cancelled = threading.Event()
    cancelled.set()
    with running(fake) as executor:
        req = executor.submit(request("gone", cancelled=cancelled))
        keep = executor.submit(request("kept"))
        executor.start()
        error = error_of(req)
        outcome(keep)
    assert isinstance(error, JobCancelled) and error.job_id == "gone"
    assert error.reason == "cancelled before it started"
    assert fake.job_ids == [["kept"]]


def test_cancel_while_running_stops_at_the_next_step() -> None:
    fake = FakeGenerate(step_s=0.02)
    cancelled = threading.Event()
    req = request("run", steps=150, cancelled=cancelled)
    req.on_progress = lambda step, total: cancelled.set() if step == 3 else None
    with running(fake) as executor:
        executor.start()
        executor.submit(req)
        error = error_of(req)
    assert isinstance(error, JobCancelled) and error.job_id == "run"
    assert error.reason == "cancelled while running, at step 3/150"
    assert fake.steps_run == 3


def test_cancel_of_one_job_in_a_batch_lets_the_others_finish() -> None:
    fake = FakeGenerate(step_s=0.01)
    cancelled = threading.Event()
    with running(fake, max_batch=2) as executor:
        gone = executor.submit(request("gone", steps=6, cancelled=cancelled))
        kept = executor.submit(request("kept", steps=6))
        gone.on_progress = lambda step, total: cancelled.set()
        executor.start()
        assert isinstance(error_of(gone), JobCancelled)
        assert outcome(kept).shape == (1, 64, 64, 3)
    assert fake.job_ids == [["gone", "kept"]] and fake.steps_run == 6


def test_interrupt_stops_the_running_batch_at_its_next_step_and_refuses_the_rest() -> None:
    """The cold shutdown: every job ends with JobInterrupted (not a cancel, not a failure)."""
    fake = FakeGenerate(step_s=0.02)
    with running(fake, max_batch=2) as executor:
        first = request("run-a", steps=150)
        second = request("run-b", steps=150)
        waiting = request("waiting", steps=150, width=128)  # another batch key: queued behind
        first.on_progress = lambda step, total: executor.interrupt() if step == 3 else None
        for req in (first, second, waiting):
            executor.submit(req)
        executor.start()
        errors = [error_of(req) for req in (first, second, waiting)]
        late = executor.submit(request("late"))
        assert isinstance(error_of(late), JobInterrupted) and executor.interrupted
    assert all(isinstance(error, JobInterrupted) for error in errors), errors
    assert "shut down at step 3/150" in str(errors[0]) and "before this job ran" in str(errors[2])
    assert fake.job_ids == [["run-a", "run-b"]] and fake.steps_run < 50


def test_deadline_stops_the_call_at_a_step() -> None:
    fake = FakeGenerate(step_s=0.02)
    with running(fake, time_limit_s=0.1) as executor:
        executor.start()
        req = executor.submit(request("slow", steps=150, deadline_s=0.1))
        error = error_of(req)
    assert isinstance(error, GenerationError)
    assert str(error) == (
        f"stopped at the job time limit (0.1 s, SDQ_JOB_TIME_LIMIT_S) at step {fake.steps_run}; "
        "lower steps, width/height or num_images"
    )
    assert fake.steps_run < 100


def test_the_earliest_deadline_in_a_batch_stops_the_call() -> None:
    fake = FakeGenerate(step_s=0.02)
    with running(fake, max_batch=2, time_limit_s=0.1) as executor:
        reqs = [
            executor.submit(request("late", steps=150, deadline_s=WAIT_S)),
            executor.submit(request("soon", steps=150, deadline_s=0.1)),
        ]
        executor.start()
        errors = [error_of(req) for req in reqs]
    assert fake.job_ids == [["late", "soon"]]
    assert all(isinstance(error, GenerationError) and "job time limit" in str(error) for error in errors)
    assert fake.steps_run < 100


def test_progress_is_reported_after_each_step_for_every_job() -> None:
    fake = FakeGenerate()
    seen: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    with running(fake, max_batch=2) as executor:
        reqs = [executor.submit(request(name, steps=3)) for name in seen]
        for req in reqs:
            req.on_progress = lambda step, total, name=req.job_id: seen[name].append((step, total))
        executor.start()
        for req in reqs:
            outcome(req)
    assert seen == {"a": [(1, 3), (2, 3), (3, 3)], "b": [(1, 3), (2, 3), (3, 3)]}


def test_cancel_after_the_last_step_still_cancels() -> None:
    fake = FakeGenerate()
    cancelled = threading.Event()
    with running(fake, max_batch=2) as executor:
        gone = executor.submit(request("gone", steps=2, cancelled=cancelled))
        kept = executor.submit(request("kept", steps=2))
        gone.on_progress = lambda step, total: cancelled.set() if step == total else None
        executor.start()
        error = error_of(gone)
        assert outcome(kept).shape == (1, 64, 64, 3)
    assert isinstance(error, JobCancelled) and error.job_id == "gone"
    assert error.reason == "cancelled while running"
    assert fake.steps_run == 2


def test_out_of_memory_batch_is_rerun_job_by_job(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeGenerate(oom_when=lambda batch: len(batch) > 1)
    with running(fake, max_batch=4) as executor, caplog.at_level(logging.WARNING, LOGGER):
        reqs = [executor.submit(request("a")), executor.submit(request("b", images=2))]
        executor.start()
        shapes = [outcome(req).shape for req in reqs]
    assert fake.job_ids == [["a", "b"], ["a"], ["b"]]
    assert [r.getMessage() for r in executor_records(caplog)] == [
        "out of memory at batch 2; running its jobs one by one"
    ]
    assert shapes == [(1, 64, 64, 3), (2, 64, 64, 3)]


def test_out_of_memory_single_job_fails_with_advice() -> None:
    fake = FakeGenerate(oom_when=lambda batch: True)
    with running(fake) as executor:
        executor.start()
        req = executor.submit(request("big", images=3))
        error = error_of(req)
        after = executor.submit(request("next", images=1))  # the executor goes on serving
        assert isinstance(error_of(after), GenerationError)
    assert isinstance(error, GenerationError)
    assert str(error) == "out of GPU memory for 3 image(s) of 64x64; lower width, height or num_images"


def test_pipeline_bug_fails_the_batch_not_the_executor(caplog: pytest.LogCaptureFixture) -> None:
    calls = {"n": 0}

    def generate(batch: list[GenerationRequest], on_step: Any, pad_to: int = 0) -> list[Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("boom")
        return FakeGenerate()(batch, on_step, pad_to)

    with running(FakeGenerate()) as executor, caplog.at_level(logging.ERROR, LOGGER):
        executor.generate = generate
        executor.start()
        broken = executor.submit(request("broken"))
        error = error_of(broken)
        assert isinstance(error, GenerationError) and str(error) == "pipeline error: ValueError: boom"
        assert outcome(executor.submit(request("fine"))).shape == (1, 64, 64, 3)
    [record] = executor_records(caplog)
    assert record.getMessage() == "pipeline call failed for ['broken']" and record.exc_info is not None


def test_watchdog_fires_once_on_a_call_that_never_reaches_a_step(caplog: pytest.LogCaptureFixture) -> None:
    stuck = threading.Semaphore(0)
    fake = FakeGenerate(hang_when=lambda batch: True)
    with (
        running(fake, hard_limit_s=0.6, on_stuck=stuck.release) as executor,
        caplog.at_level(logging.CRITICAL, LOGGER),
    ):
        executor.start()
        executor.submit(request("hung"))
        assert stuck.acquire(timeout=WAIT_S)
        assert not stuck.acquire(timeout=0.5), "fired again for the same call"
    assert [r.getMessage() for r in executor_records(caplog)] == [
        "GPU call stuck for over 1s; exiting so the worker restarts"
    ]


def test_watchdog_leaves_calls_that_reach_their_steps_alone() -> None:
    stuck = threading.Event()
    fake = FakeGenerate(step_s=0.06)
    with running(fake, hard_limit_s=1.5, on_stuck=stuck.set) as executor:
        executor.start()
        time.sleep(0.4)  # a watchdog tick (0.375 s) on the idle GPU thread
        outcome(executor.submit(request("slow but fine", steps=10)))  # 0.6 s: over one tick
        time.sleep(0.4)  # and one after the call
    assert not stuck.is_set()


def test_watchdog_exits_the_process_with_code_75_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    codes: list[int] = []
    exited = threading.Event()

    def record_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    monkeypatch.setattr(os, "_exit", record_exit)  # the real one would end the test run
    fake = FakeGenerate(hang_when=lambda batch: True)
    with running(fake, hard_limit_s=0.25) as executor:
        executor.start()
        executor.submit(request("hung"))
        assert fake.started.wait(WAIT_S)
        began = time.monotonic()
        assert exited.wait(WAIT_S)
        late_by = time.monotonic() - began - 0.25
    assert codes == [75]  # EX_TEMPFAIL, as docs/settings.md says for SDQ_HARD_LIMIT_GRACE_S
    assert late_by < 0.45, "it checks a few times per hard limit, not once a second"


def test_counters_record_calls_and_busy_time() -> None:
    fake = FakeGenerate(step_s=0.05)
    with running(fake) as executor:
        executor.start()
        began = time.monotonic()
        for name in ("a", "b"):
            outcome(executor.submit(request(name, steps=4)))
        elapsed = time.monotonic() - began
        assert executor.batches_run == 2
        assert 2 * 4 * 0.05 <= executor.busy_seconds <= elapsed


def test_a_full_batch_does_not_wait_for_jobs_still_preparing() -> None:
    fake = FakeGenerate()
    with running(fake, max_batch=2, flush_window_s=WAIT_S) as executor:
        executor.start()
        began = time.monotonic()
        with executor.preparing():  # a third task thread, preparing throughout
            with executor.preparing(), executor.preparing():
                reqs = [executor.submit(request(name)) for name in ("a", "b")]
            for req in reqs:
                outcome(req)
            waited = time.monotonic() - began
    assert waited < WAIT_S / 2
    assert fake.job_ids == [["a", "b"]]


def test_a_preparation_that_ends_without_a_job_releases_the_window() -> None:
    fake = FakeGenerate()
    with running(fake, max_batch=4, flush_window_s=WAIT_S) as executor:
        executor.start()
        began = time.monotonic()
        with executor.preparing():  # another task thread whose input download will fail
            with executor.preparing():
                req = executor.submit(request("first"))
            time.sleep(0.1)
        outcome(req)
        waited = time.monotonic() - began
    assert waited < WAIT_S / 2
    assert fake.job_ids == [["first"]]


def test_stop_fails_jobs_that_never_started() -> None:
    fake = FakeGenerate(hang_when=lambda batch: batch[0].job_id == "running")
    executor = GpuExecutor(fake, 1, 0.0, 60.0)
    executor.start()
    first = executor.submit(request("running"))
    assert fake.started.wait(WAIT_S)
    waiting = executor.submit(request("waiting"))
    threading.Timer(0.1, fake.release.set).start()
    executor.stop()
    assert outcome(first).shape == (1, 64, 64, 3)
    error = error_of(waiting)
    assert isinstance(error, GenerationError) and str(error) == "the worker stopped before this job ran"


def test_stop_does_not_wait_forever_on_a_hung_call() -> None:
    fake = FakeGenerate(hang_when=lambda batch: True)
    executor = GpuExecutor(fake, 1, 0.0, 60.0, on_stuck=lambda: None)
    executor.start()
    hung = executor.submit(request("hung"))
    assert fake.started.wait(WAIT_S)
    began = time.monotonic()
    executor.stop(timeout_s=0.2)
    assert time.monotonic() - began < WAIT_S / 2
    fake.release.set()
    assert outcome(hung).shape == (1, 64, 64, 3), "the call, once it ends, still settles its job"


def test_a_short_result_list_fails_the_jobs_it_left_out() -> None:
    def generate(batch: list[GenerationRequest], on_step: Any, pad_to: int = 0) -> list[Any]:
        return FakeGenerate()(batch, on_step, pad_to)[:1]

    with running(FakeGenerate(), max_batch=2) as executor:
        executor.generate = generate
        reqs = [executor.submit(request(name)) for name in ("a", "b")]
        executor.start()
        assert outcome(reqs[0]).shape == (1, 64, 64, 3)
        error = error_of(reqs[1])
        assert outcome(executor.submit(request("next"))).shape == (1, 64, 64, 3)
    assert isinstance(error, GenerationError) and str(error) == "pipeline error: 1 results for 2 jobs"


def test_stop_before_start_fails_the_queued_jobs() -> None:
    executor = GpuExecutor(FakeGenerate(), 1, 0.0, 60.0)
    queued = executor.submit(request("queued"))
    executor.stop()  # a worker shutting down while its model was still loading
    assert executor.state is ExecutorState.DEFUNCT
    assert str(error_of(queued)) == "the worker stopped before this job ran"
