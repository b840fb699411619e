"""The GPU thread: the only code that touches the model, one pipeline call at a time.

Celery task threads prepare jobs (validation, input download) and hand them here. The GPU
thread takes the most urgent job (interactive lane first, then arrival order), adds compatible
jobs (same mode, size, steps, guidance, scheduler, strength) up to ``max_batch`` images, and
runs them as one call. It waits for more jobs only while other task threads are still preparing
one, and never longer than the flush window, so a lone job is never delayed. Encoding and upload
happen back in the task threads, overlapped with the next batch.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from sdqueue.errors import GenerationError, JobCancelled
from sdqueue_worker.accel import bucket_for
from sdqueue_worker.generation import GenerationRequest, run_batch
from sdqueue_worker.runtime import Runtime

log = logging.getLogger(__name__)
HARD_LIMIT_GRACE_S = 60.0
"""The watchdog exits the process when one pipeline call outlives the job time limit by this."""


def job_slots(max_batch: int) -> int:
    """Celery task threads feeding the GPU thread: 1 without micro-batching, else 2 x max_batch,
    so one batch can be prepared and uploaded while another runs."""
    return 1 if max_batch == 1 else 2 * max_batch


class _Stop(Exception):
    """Raised from the step callback to abort a pipeline call."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class GpuExecutor:
    """Serialises all model work on one thread and batches compatible jobs."""

    def __init__(
        self,
        runtime: Runtime,
        max_batch: int,
        flush_window_s: float,
        time_limit_s: float,
        buckets: list[int] | None = None,
        prepare: Callable[[], object] | None = None,
    ) -> None:
        self.runtime = runtime
        self.max_batch = max_batch
        self.flush_window_s = flush_window_s
        self.time_limit_s = time_limit_s
        self.hard_limit_s = time_limit_s + HARD_LIMIT_GRACE_S
        self.buckets = buckets
        self._prepare = prepare
        self.ready = threading.Event()
        self.start_error: BaseException | None = None
        self._cond = threading.Condition()
        self._pending: list[tuple[int, int, GenerationRequest]] = []
        self._order = itertools.count()
        self._preparing = 0
        self._busy_since: float | None = None
        self.batches_run = 0
        self.busy_seconds = 0.0
        threading.Thread(target=self._loop, name="sdq-gpu", daemon=True).start()
        threading.Thread(target=self._watchdog, name="sdq-gpu-watchdog", daemon=True).start()

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
        with self._cond:
            self._pending.append((request.lane_rank, next(self._order), request))
            self._cond.notify_all()
        return request

    def _take_batch(self) -> list[GenerationRequest]:
        with self._cond:
            while not self._pending:
                self._cond.wait()
            first = min(self._pending)[2]
            flush_at = time.monotonic() + self.flush_window_s
            while True:
                batch = self._compatible(first)
                remaining = flush_at - time.monotonic()
                if (
                    sum(len(r.seeds) for r in batch) >= self.max_batch
                    or not self._preparing
                    or remaining <= 0
                ):
                    break
                self._cond.wait(remaining)
            chosen = {id(r) for r in batch}
            self._pending = [entry for entry in self._pending if id(entry[2]) not in chosen]
            return batch

    def _compatible(self, first: GenerationRequest) -> list[GenerationRequest]:
        batch, images = [first], len(first.seeds)
        for _, _, request in sorted(self._pending, key=lambda entry: entry[:2]):
            if request is first or request.batch_key != first.batch_key:
                continue
            if images + len(request.seeds) <= self.max_batch:
                batch.append(request)
                images += len(request.seeds)
        return batch

    def wait_ready(self) -> None:
        """Block until the GPU thread finished its start-up work (optimise, compile, warm-up)."""
        self.ready.wait()
        if self.start_error is not None:
            raise RuntimeError(f"GPU thread start-up failed: {self.start_error}") from self.start_error

    def _loop(self) -> None:
        try:
            if self._prepare:
                self._prepare()
        except BaseException as exc:
            self.start_error = exc
            return
        finally:
            self.ready.set()
        while True:
            batch = [r for r in self._take_batch() if self._still_wanted(r)]
            if batch:
                self._run(batch)

    @staticmethod
    def _still_wanted(request: GenerationRequest) -> bool:
        if request.cancelled():
            request.future.set_exception(JobCancelled(request.job_id, "cancelled before it started"))
            return False
        return True

    def _run(self, batch: list[GenerationRequest]) -> None:
        started = time.monotonic()
        self._busy_since = started
        try:
            images = sum(len(r.seeds) for r in batch)
            for request in batch:
                request.batch_images = images
            pad_to = bucket_for(images, self.buckets) if self.buckets else 0
            results = run_batch(self.runtime, batch, self._step_callback(batch), pad_to)
        except _Stop as stop:
            self._fail(batch, stop.error)
        except torch.cuda.OutOfMemoryError:
            self._out_of_memory(batch)
        except Exception as exc:  # a pipeline bug must fail these jobs, never the worker
            log.exception("pipeline call failed for %s", [r.job_id for r in batch])
            self._fail(batch, GenerationError(f"pipeline error: {type(exc).__name__}: {exc}"))
        else:
            for request, pixels in zip(batch, results, strict=False):
                self._settle(request, pixels)
        finally:
            self._busy_since = None
            self.busy_seconds += time.monotonic() - started
            self.batches_run += 1

    def _settle(self, request: GenerationRequest, pixels: object) -> None:
        if request.cancelled():
            request.future.set_exception(JobCancelled(request.job_id, "cancelled while running"))
        else:
            request.future.set_result(pixels)

    @staticmethod
    def _fail(batch: list[GenerationRequest], error: Exception) -> None:
        for request in batch:
            if not request.future.done():
                request.future.set_exception(error)

    def _out_of_memory(self, batch: list[GenerationRequest]) -> None:
        free_memory()
        if len(batch) > 1:
            log.warning("out of memory at batch %d; running its jobs one by one", len(batch))
            for request in batch:
                self._run([request])
            return
        job = batch[0].job
        self._fail(
            batch,
            GenerationError(
                f"out of GPU memory for {job.num_images} image(s) of {job.width}x{job.height}; "
                "lower width, height or num_images"
            ),
        )

    def _step_callback(self, batch: list[GenerationRequest]):  # type: ignore[no-untyped-def]
        def on_step(step: int) -> None:
            for request in batch:
                if request.on_progress:
                    request.on_progress(step + 1, request.total_steps)
            if all(request.cancelled() for request in batch):
                first = batch[0]
                reason = f"cancelled while running, at step {step + 1}/{first.total_steps}"
                raise _Stop(JobCancelled(first.job_id, reason))
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
        while True:
            time.sleep(1.0)
            since = self._busy_since
            if since is not None and time.monotonic() - since > self.hard_limit_s:
                log.critical(
                    "GPU call stuck for over %.0fs; exiting so the worker restarts", self.hard_limit_s
                )
                os._exit(75)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
