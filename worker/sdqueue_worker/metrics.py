"""Prometheus metrics of one worker process, served on ``SDQ_METRICS_PORT`` (``/metrics``).

* ``sdqueue_jobs_total{mode,outcome}``: jobs that ended succeeded, failed or cancelled, counted
  once per job id across all workers (a Redis ``SET NX`` marks a job counted; a redelivered or
  duplicated job is not counted again);
* ``sdqueue_job_deliveries_total{mode,outcome}``: every delivery that ended, retries included
  (outcome succeeded, failed, cancelled or retried);
* ``sdqueue_running_jobs{lane}``: deliveries this worker is handling right now;
* ``sdqueue_queue_depth{lane}``: messages waiting in Redis per lane (interactive, bulk, and
  notify: webhook deliveries), read with ``LLEN`` at scrape time;
* ``sdqueue_queue_wait_seconds{lane,source}``: from submission to the start of a job's first
  delivery. ``source="producer"`` when the message carries the ``sdq_submitted_at`` header
  (Unix seconds; the sdqueue client sets it, other clients may), else ``source="worker_received"``:
  from the moment this worker's consumer received the message, a lower bound that misses the
  time spent in the Redis list before it;
* ``sdqueue_build_info{version,python,celery,torch,model}``: always 1, labels say what runs;
* ``sdqueue_job_duration_seconds{phase}``: queue_wait, input_fetch, generate, encode_upload and
  total, the timings the JobRunner writes into each manifest (observed once per job it ran);
* ``sdqueue_batch_images``: images in the pipeline call that produced each job;
* ``sdqueue_gpu_max_memory_allocated_bytes``: ``torch.cuda.max_memory_allocated()``, the peak of
  tensor memory since start (0 without CUDA; the caching allocator reserves more than this);
* ``sdqueue_model_load_seconds``: how long the model took to load at start;
* ``sdqueue_worker_busy_seconds_total`` / ``sdqueue_gpu_batches_total``: time the GPU thread spent
  in pipeline calls (accrues during a call, read at scrape time, so ``rate()`` is right during
  long jobs), and how many calls ended (busy / wall clock = utilisation of the GPU thread);
* ``sdqueue_notifications_total{kind,outcome}``: webhooks and callback tasks sent, retried, failed.

Flower's own ``/metrics`` covers Celery task events; these cover what Flower cannot see.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery import signals
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sdqueue.names import BULK_QUEUE, INTERACTIVE_QUEUE, KEY_PREFIX, NOTIFY_QUEUE
from sdqueue.states import JobState
from sdqueue_worker.outcomes import JOB_TASKS, outcome_of

log = logging.getLogger(__name__)

OUTCOME_LABELS = {
    JobState.SUCCEEDED: "succeeded",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
    JobState.RETRYING: "retried",
}
"""The ``outcome`` label for each way a delivery ends (jobs_total has the final three only)."""
FINAL_LABELS = ("succeeded", "failed", "cancelled")
LANE_OF_QUEUE = {INTERACTIVE_QUEUE: "interactive", BULK_QUEUE: "bulk", NOTIFY_QUEUE: "notify"}
COUNTED_TTL_S = 7 * 24 * 3600
AT_START_METRICS = (
    "sdqueue_worker_busy_seconds_total",
    "sdqueue_gpu_batches_total",
    "sdqueue_queue_depth",
    "sdqueue_build_info",
)
"""Sample names registered by ``start_metrics`` (they need the running worker's state)."""
PHASES = {
    "queue_wait_s": "queue_wait",
    "input_fetch_s": "input_fetch",
    "generate_s": "generate",
    "encode_upload_s": "encode_upload",
    "total_s": "total",
}
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

JOBS = Counter("sdqueue_jobs", "Jobs that ended, once per job id, by mode and outcome.", ["mode", "outcome"])
DELIVERIES = Counter(
    "sdqueue_job_deliveries", "Job deliveries that ended, retries included.", ["mode", "outcome"]
)
RUNNING = Gauge("sdqueue_running_jobs", "Job deliveries this worker is handling now.", ["lane"])
QUEUE_WAIT = Histogram(
    "sdqueue_queue_wait_seconds",
    "Submission to the start of a job's first delivery; source says which clock.",
    ["lane", "source"],
    buckets=DURATION_BUCKETS,
)
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
        DELIVERIES.labels(_mode, _outcome)
        if _outcome in FINAL_LABELS:
            JOBS.labels(_mode, _outcome)
for _phase in PHASES.values():
    DURATION.labels(_phase)
for _lane_name in ("interactive", "bulk"):
    RUNNING.labels(_lane_name)
    for _source in ("producer", "worker_received"):
        QUEUE_WAIT.labels(_lane_name, _source)
_redis: Any = None
"""The worker's Redis client, set by start_metrics (marks jobs counted)."""
_received_at: dict[str, float] = {}
_received_lock = threading.Lock()


def observe_job(mode: str, timings: dict[str, float], batch_images: int) -> None:
    """Record the phase timings of a job the runner has just committed."""
    for key, phase in PHASES.items():
        if key in timings:
            DURATION.labels(phase).observe(timings[key])
    if batch_images:
        BATCH_IMAGES.observe(batch_images)


class _GpuThreadCollector(Collector):  # type: ignore[misc]
    """Reads the GPU thread's own counters at scrape time, the running call included."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self._busy_reported = 0.0
        self._lock = threading.Lock()

    def busy_seconds(self) -> float:
        """Finished calls plus the running one; never less than a previous answer (a call ending
        between the two reads below would otherwise be missed once)."""
        since = self.executor._busy_since
        running = time.monotonic() - since if since is not None else 0.0
        with self._lock:
            self._busy_reported = max(self._busy_reported, float(self.executor.busy_seconds) + running)
            return self._busy_reported

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "sdqueue_worker_busy_seconds",
            "Seconds the GPU thread spent in pipeline calls, the running one included.",
            value=self.busy_seconds(),
        )
        yield CounterMetricFamily(
            "sdqueue_gpu_batches",
            "Pipeline calls run by the GPU thread.",
            value=float(self.executor.batches_run),
        )


class _QueueDepthCollector(Collector):  # type: ignore[misc]
    """``LLEN`` of each lane's Redis list at scrape time (nothing exported while Redis is down)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "sdqueue_queue_depth", "Messages waiting in Redis per lane.", labels=["lane"]
        )
        try:
            pipe = self.client.pipeline()
            for queue in LANE_OF_QUEUE:
                pipe.llen(queue)
            for lane, depth in zip(LANE_OF_QUEUE.values(), pipe.execute(), strict=True):
                family.add_metric([lane], float(depth))
        except Exception as exc:  # a scrape must not fail because Redis is away
            log.debug("queue depth not read: %s", exc)
        yield family


def build_info(state: Any) -> dict[str, str]:
    """The labels of ``sdqueue_build_info``."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "unknown"

    return {
        "version": of("sdqueue"),
        "python": platform.python_version(),
        "celery": of("celery"),
        "torch": of("torch"),
        "model": str(getattr(state.runtime, "model_id", state.settings.model)),
    }


def _gpu_max_memory() -> float:
    import torch

    return float(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0.0


def start_metrics(state: Any) -> int:
    """Serve /metrics for this worker (state: the WorkerState); returns the port."""
    global _redis
    port = int(state.settings.metrics_port)
    _redis = state.redis
    MODEL_LOAD.set(state.runtime.load_seconds)
    GPU_MAX_MEMORY.set_function(_gpu_max_memory)
    REGISTRY.register(_GpuThreadCollector(state.executor))
    REGISTRY.register(_QueueDepthCollector(state.redis))
    info = build_info(state)
    Gauge("sdqueue_build_info", "Always 1; the labels say what this worker runs.", list(info)).labels(
        **info
    ).set(1)
    start_http_server(port, addr=state.settings.metrics_addr)
    log.info("Prometheus metrics on %s:%d/metrics", state.settings.metrics_addr, port)
    return port


def _lane(request: Any) -> str:
    routing_key = (getattr(request, "delivery_info", None) or {}).get("routing_key")
    return LANE_OF_QUEUE.get(routing_key or "", "interactive")


def _count_job_once(job_id: str) -> bool:
    """True the first time any worker ends this job (best effort: counts if Redis is away)."""
    if _redis is None:  # metrics not served: nothing reads the count
        return True
    try:
        return bool(_redis.set(f"{KEY_PREFIX}counted:{job_id}", 1, nx=True, ex=COUNTED_TTL_S))
    except Exception:
        return True


@signals.task_received.connect
def _note_received(request: Any = None, **_: Any) -> None:
    if getattr(request, "name", "") in JOB_TASKS:
        with _received_lock:
            _received_at[str(request.id)] = time.time()


@signals.task_prerun.connect
def _job_started(sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if getattr(sender, "name", "") not in JOB_TASKS or task is None:
        return
    request = task.request
    lane = _lane(request)
    RUNNING.labels(lane).inc()
    with _received_lock:
        received = _received_at.pop(str(task_id), None)
    if request.retries:
        return
    submitted = request.get("sdq_submitted_at")
    if isinstance(submitted, (int, float)) and not isinstance(submitted, bool):
        QUEUE_WAIT.labels(lane, "producer").observe(max(0.0, time.time() - float(submitted)))
    elif received is not None:
        QUEUE_WAIT.labels(lane, "worker_received").observe(max(0.0, time.time() - received))


@signals.task_postrun.connect
def _count_delivery(
    sender: Any = None,
    task_id: str | None = None,
    task: Any = None,
    state: str | None = None,
    retval: Any = None,
    **_: Any,
) -> None:
    mode = JOB_TASKS.get(getattr(sender, "name", ""))
    if not mode:
        return
    if task is not None:
        RUNNING.labels(_lane(task.request)).dec()
    outcome = outcome_of(state or "", retval)
    if outcome is None:
        return
    label = OUTCOME_LABELS[outcome]
    DELIVERIES.labels(mode, label).inc()
    if label in FINAL_LABELS and _count_job_once(str(task_id)):
        JOBS.labels(mode, label).inc()


@signals.task_revoked.connect
def _count_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    mode = JOB_TASKS.get(getattr(sender, "name", ""))
    if mode:
        DELIVERIES.labels(mode, "cancelled").inc()
        if _count_job_once(str(getattr(request, "id", ""))):
            JOBS.labels(mode, "cancelled").inc()
        with _received_lock:
            _received_at.pop(str(getattr(request, "id", "")), None)
