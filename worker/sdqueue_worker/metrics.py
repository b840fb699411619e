"""Prometheus metrics of one worker process, served on ``SDQ_METRICS_PORT`` (``/metrics``).

* ``sdqueue_jobs_total{mode,outcome}``: job deliveries that ended succeeded, failed, cancelled or
  retried (counted from Celery's task_postrun / task_revoked signals);
* ``sdqueue_job_duration_seconds{phase}``: queue_wait, input_fetch, generate, encode_upload and
  total, the timings the JobRunner writes into each manifest (observed once per job it ran);
* ``sdqueue_batch_images``: images in the pipeline call that produced each job;
* ``sdqueue_gpu_max_memory_allocated_bytes``: ``torch.cuda.max_memory_allocated()``, the peak of
  tensor memory since start (0 without CUDA; the caching allocator reserves more than this);
* ``sdqueue_model_load_seconds``: how long the model took to load at start;
* ``sdqueue_worker_busy_seconds_total`` / ``sdqueue_gpu_batches_total``: time the GPU thread spent
  in pipeline calls, and how many calls (busy / wall clock = utilisation of the GPU thread);
* ``sdqueue_notifications_total{kind,outcome}``: webhooks and callback tasks sent, retried, failed.

Flower's own ``/metrics`` covers Celery task events; these cover what Flower cannot see.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from celery import signals
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from sdqueue.states import JobState
from sdqueue_worker.outcomes import JOB_TASKS, outcome_of

log = logging.getLogger(__name__)

OUTCOME_LABELS = {
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
    JobState.RETRYING: "retried",
}
"""The ``outcome`` label of ``sdqueue_jobs_total`` for each way a delivery ends."""
PHASES = {
    "queue_wait_s": "queue_wait",
    "input_fetch_s": "input_fetch",
    "generate_s": "generate",
    "encode_upload_s": "encode_upload",
    "total_s": "total",
}
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

JOBS = Counter("sdqueue_jobs", "Job deliveries by mode and outcome.", ["mode", "outcome"])
DURATION = Histogram(
    "sdqueue_job_duration_seconds",
    "Job time by phase (from the manifest timings).",
    ["phase"],
    buckets=DURATION_BUCKETS,
)
BATCH_IMAGES = Histogram(
    "sdqueue_batch_images",
    "Images in the pipeline call that produced a job.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
GPU_MAX_MEMORY = Gauge(
    "sdqueue_gpu_max_memory_allocated_bytes",
    "Peak tensor memory allocated on the GPU since start (0 without CUDA).",
)
MODEL_LOAD = Gauge("sdqueue_model_load_seconds", "Seconds the model took to load at worker start.")
NOTIFICATIONS = Counter(
    "sdqueue_notifications", "Completion notifications by kind and outcome.", ["kind", "outcome"]
)

for _mode in JOB_TASKS.values():
    for _outcome in OUTCOME_LABELS.values():
        JOBS.labels(_mode, _outcome)
for _phase in PHASES.values():
    DURATION.labels(_phase)


def observe_job(mode: str, timings: dict[str, float], batch_images: int) -> None:
    """Record the phase timings of a job the runner has just committed."""
    for key, phase in PHASES.items():
        if key in timings:
            DURATION.labels(phase).observe(timings[key])
    if batch_images:
        BATCH_IMAGES.observe(batch_images)


class _GpuThreadCollector(Collector):  # type: ignore[misc]
    """Reads the GPU thread's own counters at scrape time."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "sdqueue_worker_busy_seconds",
            "Seconds the GPU thread spent in pipeline calls.",
            value=float(self.executor.busy_seconds),
        )
        yield CounterMetricFamily(
            "sdqueue_gpu_batches",
            "Pipeline calls run by the GPU thread.",
            value=float(self.executor.batches_run),
        )


def _gpu_max_memory() -> float:
    import torch

    return float(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0.0


def start_metrics(state: Any) -> int:
    """Serve /metrics for this worker (state: the WorkerState); returns the port."""
    port = int(state.settings.metrics_port)
    MODEL_LOAD.set(state.runtime.load_seconds)
    GPU_MAX_MEMORY.set_function(_gpu_max_memory)
    REGISTRY.register(_GpuThreadCollector(state.executor))
    start_http_server(port, addr=state.settings.metrics_addr)
    log.info("Prometheus metrics on %s:%d/metrics", state.settings.metrics_addr, port)
    return port


@signals.task_postrun.connect
def _count_delivery(sender: Any = None, state: str | None = None, retval: Any = None, **_: Any) -> None:
    mode = JOB_TASKS.get(getattr(sender, "name", ""))
    outcome = outcome_of(state or "", retval)
    if mode and outcome:
        JOBS.labels(mode, OUTCOME_LABELS[outcome]).inc()


@signals.task_revoked.connect
def _count_revoked(sender: Any = None, **_: Any) -> None:
    mode = JOB_TASKS.get(getattr(sender, "name", ""))
    if mode:
        JOBS.labels(mode, OUTCOME_LABELS[JobState.CANCELLED]).inc()
