"""Test doubles for the GPU side (like dramatiq's StubBroker or httpx's MockTransport).

``FakeGenerate`` stands in for ``run_batch`` in a ``GpuExecutor``: no model, no torch maths,
the same calling convention, so lane order, grouping, the flush window, cancel, the deadline
and the out-of-memory split can be tested in-process in milliseconds::

    fake = FakeGenerate(step_s=0.01)
    executor = GpuExecutor(fake, max_batch=4, flush_window_s=0.05, time_limit_s=10)
    executor.start()
    ...
    fake.job_ids  # [["a", "b"], ["c"]]: the batches it was handed, in order
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from sdqueue_worker.generation import GenerationRequest

BatchTest = Callable[[list[GenerationRequest]], bool]


def _never(batch: list[GenerationRequest]) -> bool:
    return False


class FakeGenerate:
    """A generate function that records its batches and misbehaves on demand.

    Each call sleeps ``step_s`` per denoising step and calls ``on_step(i)`` after step ``i``
    (0-based, ``total_steps`` of the first job: img2img runs ``steps * strength`` of them), as
    diffusers' ``callback_on_step_end`` does, so exceptions raised by the callback stop the
    call. ``oom_when(batch)`` makes a call raise ``torch.cuda.OutOfMemoryError`` before its
    first step; ``hang_when(batch)`` makes it block without reaching a step until ``release``
    is set (or ``hang_s`` passed), like a hung kernel. Images are uint8 arrays whose every
    pixel is ``seed % 256``.
    """

    def __init__(
        self,
        step_s: float = 0.0,
        oom_when: BatchTest = _never,
        hang_when: BatchTest = _never,
        hang_s: float = 60.0,
    ) -> None:
        self.step_s = step_s
        self.oom_when = oom_when
        self.hang_when = hang_when
        self.hang_s = hang_s
        self.release = threading.Event()
        self.batches: list[list[GenerationRequest]] = []
        self.pad_to: list[int] = []
        self.steps_run = 0
        self.started = threading.Event()
        """Set when the first call begins."""
        self._lock = threading.Lock()

    @property
    def job_ids(self) -> list[list[str]]:
        """The job ids of each batch handed over, in call order."""
        with self._lock:
            return [[request.job_id for request in batch] for batch in self.batches]

    def __call__(
        self, batch: list[GenerationRequest], on_step: Callable[[int], None], pad_to: int = 0
    ) -> list[np.ndarray]:
        with self._lock:
            self.batches.append(list(batch))
            self.pad_to.append(pad_to)
        self.started.set()
        if self.oom_when(batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (FakeGenerate)")
        if self.hang_when(batch):
            self.release.wait(self.hang_s)
        for step in range(batch[0].total_steps):
            time.sleep(self.step_s)
            with self._lock:
                self.steps_run += 1
            on_step(step)
        return [self._pixels(request) for request in batch]

    @staticmethod
    def _pixels(request: GenerationRequest) -> np.ndarray:
        job = request.job
        height, width = job.height or 512, job.width or 512  # the worker fills these in before generating
        images = np.empty((len(request.seeds), height, width, 3), dtype=np.uint8)
        for index, seed in enumerate(request.seeds):
            images[index] = seed % 256
        return images
