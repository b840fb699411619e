"""The per-process worker state, built once when the worker process starts."""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field

import redis
from celery import Celery

from sdqueue.errors import StartupError
from sdqueue.names import model_loads_key
from sdqueue.redis_conn import redis_client as connect_redis
from sdqueue_worker.accel import optimise, use_compile, warm_up
from sdqueue_worker.checks import check_startup
from sdqueue_worker.executor import GpuExecutor
from sdqueue_worker.generation import run_batch
from sdqueue_worker.jobs import JobRunner
from sdqueue_worker.progress import ProgressPublisher, SignalPump
from sdqueue_worker.runtime import Runtime, load_runtime
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.startup import note_age, timed
from sdqueue_worker.storage import WorkerStorage

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    """Model runtime, GPU thread, storage and Redis client of one worker process."""

    settings: WorkerSettings
    hostname: str
    runtime: Runtime
    executor: GpuExecutor
    storage: WorkerStorage
    redis: redis.Redis
    runner: JobRunner
    signals: SignalPump
    running: dict[str, str] = field(default_factory=dict)
    """job id -> run-lease token of the jobs this process is running now."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    publisher: ProgressPublisher | None = None
    """Sends progress and cancel reasons as Celery events (None without a Celery app)."""


_STATE: WorkerState | None = None


def redis_client(settings: WorkerSettings) -> redis.Redis:
    return connect_redis(settings, retry_on_timeout=True, health_check_interval=10)


def start_state(settings: WorkerSettings, hostname: str, app: Celery | None = None) -> WorkerState:
    """Check the broker, storage and files, load the model (once per process), start the GPU
    thread and the progress pump.

    ``app`` is the worker's Celery app, which progress is published through (None: Redis only).
    """
    global _STATE
    if _STATE is not None:
        return _STATE
    phases: dict[str, float] = {}
    note_age(phases, "process_s")  # interpreter, imports, Celery's own start
    with timed(phases, "checks_s"):
        storage = WorkerStorage(settings)
        client = redis_client(settings)
        check_startup(settings, client, storage, hostname)
    runtime = load_runtime(settings)
    runtime.startup = {**phases, "load_s": runtime.load_seconds}
    executor = GpuExecutor(
        functools.partial(run_batch, runtime),
        settings.max_batch,
        settings.flush_window_ms / 1000.0,
        time_limit_s=settings.job_time_limit_s,
        buckets=settings.compile_batch_sizes if use_compile(settings, runtime) else None,
        prepare=lambda: _prepare_gpu(runtime, settings),
        hard_limit_s=settings.job_time_limit_s + settings.hard_limit_grace_s,
    )
    executor.start()
    note_age(runtime.startup, "ready_s")
    client.incr(model_loads_key(hostname))
    publisher = ProgressPublisher(app, hostname) if app is not None else None
    _STATE = WorkerState(
        settings,
        hostname,
        runtime,
        executor,
        storage,
        client,
        JobRunner(settings, runtime, executor, storage, hostname),
        SignalPump(client, settings.progress_interval_s, publisher.publish if publisher else None).start(),
        publisher=publisher,
    )
    return _STATE


def _prepare_gpu(runtime: Runtime, settings: WorkerSettings) -> None:
    """Runs on the GPU thread before it serves: speed-ups, then warm-up (compiles buckets)."""
    with timed(runtime.startup, "optimise_s"):
        optimise(runtime, settings)
    if settings.warmup:
        runtime.warmup_seconds = warm_up(runtime, settings)
        runtime.startup["warmup_s"] = runtime.warmup_seconds


def get_state() -> WorkerState:
    if _STATE is None:
        raise StartupError("worker state not started: tasks run only inside `sdqueue worker`")
    return _STATE
