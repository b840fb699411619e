"""The GPU thread: the only code that touches the model, one pipeline call at a time.

Celery task threads prepare jobs (validation, input download) and hand them here. The GPU
thread takes the most urgent job (interactive lane first, then arrival order: one heap keyed
``(lane_rank, arrival)``), adds compatible jobs (same ``batch_key``: mode, size, steps,
guidance, scheduler, strength) up to ``max_batch`` images, and runs them as one call of its
``generate`` function. It waits for more jobs only while other task threads are still
preparing one, and never longer than the flush window, so a lone job is never delayed.
Encoding and upload happen back in the task threads, overlapped with the next batch.

The generate function is a parameter (production: ``run_batch`` bound to the runtime; tests:
``sdqueue_worker.testing.FakeGenerate``), so everything decided here runs without a model.
Life cycle: ``NEW`` -> ``start()`` -> ``STARTING`` (the ``prepare`` hook: optimise, compile,
warm up, on the GPU thread) -> ``READY``, or ``DEFUNCT`` after a failed start or ``stop()``.
``interrupt()`` (the worker's cold shutdown) ends every job, running or queued, with
``JobInterrupted`` at the next step; their messages go back to the queue.
"""

from __future__ import annotations

import enum
import gc
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from sdqueue.errors import GenerationError, JobCancelled, StartupError
from sdqueue_worker.accel import bucket_for
from sdqueue_worker.generation import GenerationRequest
from sdqueue_worker.outcomes import QUEUED_CANCEL_REASON
from sdqueue_worker.settings import job_slots

log = logging.getLogger(__name__)
HARD_LIMIT_GRACE_S = 60.0
"""The watchdog exits the process when one pipeline call outlives the job time limit by this."""
OOM_ADVICE = "lower width, height or num_images"


class Generate(Protocol):
    """One pipeline call for a batch: calls ``on_step(i)`` after each denoising step ``i`` (from 0)
    and returns one uint8 array (N, H, W, 3) per request; ``pad_to`` is a compiled batch size."""

    def __call__(
        self, batch: list[GenerationRequest], on_step: Callable[[int], None], pad_to: int = 0
    ) -> list[Any]: ...


class ExecutorState(enum.Enum):
    """Where the GPU thread is in its life (cog's ``WorkerState``)."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    DEFUNCT = "defunct"


def _exit_process() -> None:
    os._exit(75)


class JobInterrupted(Exception):
    """The worker's cold shutdown stopped this job before it ended: not a result, the job's
    message goes back to the queue (sdqueue_worker.tasks) and another worker runs it."""


NOT_RUN = "the worker shut down before this job ran"
"""The reason of a job that ``interrupt()`` refused before it ran."""


class _Stop(Exception):
    """Raised from the step callback to abort a pipeline call."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _images(batch: list[GenerationRequest]) -> int:
    return sum(len(request.seeds) for request in batch)


class GpuExecutor:
    """Serialises all model work on one thread and batches compatible jobs."""

    def __init__(
        self,
        generate: Generate,
        max_batch: int,
        flush_window_s: float,
        time_limit_s: float,
        buckets: list[int] | None = None,
        prepare: Callable[[], object] | None = None,
        hard_limit_s: float | None = None,
        on_stuck: Callable[[], None] = _exit_process,
    ) -> None:
        self.generate = generate
        self.max_batch = max_batch
        self.flush_window_s = flush_window_s
        self.time_limit_s = time_limit_s
        self.hard_limit_s = hard_limit_s if hard_limit_s is not None else time_limit_s + HARD_LIMIT_GRACE_S
        self.buckets = buckets
        self._prepare = prepare
        self._on_stuck = on_stuck
        self.state = ExecutorState.NEW
        self.start_error: BaseException | None = None
        self._cond = threading.Condition()
        self._pending: list[tuple[int, int, GenerationRequest]] = []
        """Heap of (lane_rank, arrival, request): the next job to run is ``_pending[0]``."""
        self._arrival = itertools.count()
        self._preparing = 0
        self._busy_since: float | None = None
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._interrupted = threading.Event()
        self.batches_run = 0
        self.busy_seconds = 0.0

    @property
    def slots(self) -> int:
        """How many task threads should feed this executor (Celery's concurrency)."""
        return job_slots(self.max_batch)

    def start(self) -> None:
        """Start the GPU thread and the watchdog; returns once ``prepare`` ran (state READY).

        Raises StartupError (state DEFUNCT) when ``prepare`` failed.
        """
        with self._cond:
            if self.state is not ExecutorState.NEW:
                raise StartupError(f"the GPU executor was already started (state {self.state.name})")
            self.state = ExecutorState.STARTING
        started = threading.Event()
        threads = [
            threading.Thread(target=self._loop, args=(started,), name="sdq-gpu", daemon=True),
            threading.Thread(target=self._watchdog, name="sdq-gpu-watchdog", daemon=True),
        ]
        for thread in threads:
            thread.start()
        self._threads = threads  # only started ones: a concurrent stop() joins these
        started.wait()
        if self.start_error is not None:
            raise StartupError(f"GPU thread start-up failed: {self.start_error}") from self.start_error

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop taking work: jobs not started yet fail, a running call finishes first."""
        with self._cond:
            self.state = ExecutorState.DEFUNCT
            self._stopped.set()
            left, self._pending = self._pending, []
            self._cond.notify_all()
        _fail([request for _, _, request in left], GenerationError("the worker stopped before this job ran"))
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout_s)

    def interrupt(self) -> None:
        """Cold shutdown: the running call stops at its next step, queued and later jobs are
        refused; all of them end with JobInterrupted."""
        self._interrupted.set()
        with self._cond:
            left, self._pending = self._pending, []
            self._cond.notify_all()
        _fail([request for _, _, request in left], JobInterrupted(NOT_RUN))

    @property
    def interrupted(self) -> bool:
        """True once ``interrupt()`` was called."""
        return self._interrupted.is_set()

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Mark a task thread as about to submit a job (the GPU thread may wait for it)."""
        with self._cond:
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Queue a job's share of work; its ``future`` ends with the pixels or the job's error."""
        with self._cond:
            if self._interrupted.is_set():
                request.future.set_exception(JobInterrupted(NOT_RUN))
                return request
            if self.state is ExecutorState.DEFUNCT:
                request.future.set_exception(GenerationError("the GPU executor is not running"))
                return request
            heapq.heappush(self._pending, (request.lane_rank, next(self._arrival), request))
            self._cond.notify_all()
        return request

    def _take_batch(self) -> list[GenerationRequest]:
        """The most urgent job plus compatible ones; [] once stopped."""
        with self._cond:
            while not self._pending and self.state is not ExecutorState.DEFUNCT:
                self._cond.wait()
            if not self._pending:
                return []
            flush_at = time.monotonic() + self.flush_window_s
            while True:
                batch = self._compatible()
                remaining = flush_at - time.monotonic()
                if _images(batch) >= self.max_batch or not self._preparing or remaining <= 0:
                    break
                self._cond.wait(remaining)
            chosen = {id(request) for request in batch}
            self._pending = [entry for entry in self._pending if id(entry[2]) not in chosen]
            heapq.heapify(self._pending)
            return batch

    def _compatible(self) -> list[GenerationRequest]:
        first = self._pending[0][2]
        batch, images = [first], len(first.seeds)
        for _, _, request in sorted(self._pending)[1:]:
            if request.batch_key == first.batch_key and images + len(request.seeds) <= self.max_batch:
                batch.append(request)
                images += len(request.seeds)
        return batch

    def _loop(self, started: threading.Event) -> None:
        try:
            if self._prepare:
                self._prepare()
        except BaseException as exc:
            self.start_error = exc
            self.state = ExecutorState.DEFUNCT
            return
        else:
            with self._cond:
                if self.state is ExecutorState.STARTING:
                    self.state = ExecutorState.READY
        finally:
            started.set()
        while self.state is not ExecutorState.DEFUNCT:
            batch = [request for request in self._take_batch() if _still_wanted(request)]
            if batch:
                self._run(batch)

    def _run(self, batch: list[GenerationRequest]) -> None:
        started = time.monotonic()
        self._busy_since = started
        try:
            images = _images(batch)
            for request in batch:
                request.batch_images = images
            pad_to = bucket_for(images, self.buckets) if self.buckets else 0
            results = self.generate(batch, self._step_callback(batch), pad_to)
        except _Stop as stop:
            _fail(batch, stop.error)
        except torch.cuda.OutOfMemoryError:
            self._out_of_memory(batch)
        except Exception as exc:  # a pipeline bug must fail these jobs, never the worker
            log.exception("pipeline call failed for %s", [r.job_id for r in batch])
            _fail(batch, GenerationError(f"pipeline error: {type(exc).__name__}: {exc}"))
        else:
            for request, pixels in zip(batch, results, strict=False):
                _settle(request, pixels)
            # jobs a short result list left out would otherwise wait on their futures forever
            _fail(batch, GenerationError(f"pipeline error: {len(results)} results for {len(batch)} jobs"))
        finally:
            self._busy_since = None
            self.busy_seconds += time.monotonic() - started
            self.batches_run += 1

    def _out_of_memory(self, batch: list[GenerationRequest]) -> None:
        free_memory()
        if len(batch) > 1:
            log.warning("out of memory at batch %d; running its jobs one by one", len(batch))
            for request in batch:
                self._run([request])
            return
        job = batch[0].job
        message = f"out of GPU memory for {job.num_images} image(s) of {job.width}x{job.height}; {OOM_ADVICE}"
        _fail(batch, GenerationError(message))

    def _step_callback(self, batch: list[GenerationRequest]) -> Callable[[int], None]:
        def on_step(step: int) -> None:
            for request in batch:
                if request.on_progress:
                    request.on_progress(step + 1, request.total_steps)
            if self._interrupted.is_set():
                raise _Stop(JobInterrupted(f"the worker shut down at step {step + 1}/{batch[0].total_steps}"))
            if all(request.cancelled() for request in batch):
                first = batch[0]
                reason = f"cancelled while running, at step {step + 1}/{first.total_steps}"
                raise _Stop(JobCancelled(job_id=first.job_id, message=reason))
            if time.monotonic() > min(request.deadline for request in batch):
                raise _Stop(
                    GenerationError(
                        f"stopped at the job time limit ({self.time_limit_s:g} s, SDQ_JOB_TIME_LIMIT_S) at step "
                        f"{step + 1}; lower steps, width/height or num_images"
                    )
                )

        return on_step

    def _watchdog(self) -> None:
        """Last resort for a call that never reaches a step (a hung kernel): exit the process.

        Messages are redelivered once the lease lapses; the delivery cap stops a job that hangs
        every time.
        """
        tick = min(1.0, max(self.hard_limit_s / 4, 0.01))
        while not self._stopped.wait(tick):
            since = self._busy_since
            if since is not None and time.monotonic() - since > self.hard_limit_s:
                log.critical(
                    "GPU call stuck for over %.0fs; exiting so the worker restarts", self.hard_limit_s
                )
                self._on_stuck()
                return


def _still_wanted(request: GenerationRequest) -> bool:
    if request.cancelled():
        request.future.set_exception(JobCancelled(job_id=request.job_id, message=QUEUED_CANCEL_REASON))
        return False
    return True


def _settle(request: GenerationRequest, pixels: object) -> None:
    if request.cancelled():
        request.future.set_exception(JobCancelled(job_id=request.job_id, message="cancelled while running"))
    else:
        request.future.set_result(pixels)


def _fail(batch: list[GenerationRequest], error: Exception) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(error)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
