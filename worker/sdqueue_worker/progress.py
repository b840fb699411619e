"""Progress and cancel of running jobs, in one place.

The GPU thread reports each denoising step to the job's ``StepSignals`` and asks it whether the
job was cancelled; both only touch memory, so the GPU never waits on Redis. One ``SignalPump``
thread per worker flushes the signals of the running jobs every ``interval_s``: it reads the
job's cancel key, writes the latest progress to ``sdq:progress:{job_id}`` and hands it to the
``ProgressPublisher``, which stores a PROGRESS state in the result backend
(``AsyncResult.info``) and sends a ``task-started`` event carrying ``result="step N/total"``
(Flower shows it in the task list and on the task page; see ProgressPublisher).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

from sdqueue.names import cancel_key, progress_key

log = logging.getLogger(__name__)
DAY = 24 * 3600
Publish = Callable[[str, dict[str, Any]], None]
"""``publish(job_id, body)``: where a flushed progress body goes besides its Redis key."""


def progress_text(body: dict[str, Any]) -> str:
    """``step 12/30``: what Flower shows as the result of a running job."""
    return f"step {body.get('step')}/{body.get('total')}"


class ProgressPublisher:
    """Publishes progress as Celery sees it; one event dispatcher per thread.

    Flower renders only Celery's standard task fields, and ``celery.events.state`` merges each
    event's fields into its task. So progress goes out as a repeated ``task-started`` event: the
    state stays STARTED (Flower's "Started" filter finds running jobs), ``result="step 12/30"``
    shows in the task list and on the task page until the job's own result replaces it, and the
    job's start time as ``timestamp`` keeps Flower's started time and runtime right. A cancel
    sends Celery's ``task-revoked`` with ``result="cancelled: <reason>"``: Flower shows REVOKED,
    with the reason beside it (sdqueue_worker.revoking). The cost: Flower's
    ``flower_events_total{type="task-started"}`` counts progress updates too.
    """

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._local = threading.local()
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def _dispatcher(self) -> Any:
        dispatcher = getattr(self._local, "dispatcher", None)
        if dispatcher is None:
            connection = self.app.connection_for_write()
            dispatcher = self.app.events.Dispatcher(connection, hostname=self.hostname, enabled=True)
            self._local.dispatcher = dispatcher
        return dispatcher

    def job_started(self, job_id: str) -> None:
        """Remember when a job started (its progress events carry this as their timestamp)."""
        with self._lock:
            self._started[job_id] = time.time()

    def job_ended(self, job_id: str) -> None:
        with self._lock:
            self._started.pop(job_id, None)

    def publish(self, job_id: str, body: dict[str, Any]) -> None:
        with self._lock:
            started = self._started.get(job_id)
        try:
            self.app.backend.store_result(job_id, body, "PROGRESS")
            fields = {"timestamp": started} if started else {}
            self._dispatcher().send("task-started", uuid=job_id, result=progress_text(body), **fields, **body)
        except Exception as exc:  # progress is best effort
            log.debug("progress publish failed for %s: %s", job_id, exc)
            self._local.dispatcher = None

    def revoked(self, job_id: str, reason: str) -> None:
        """Tell Flower a job was cancelled, and why: Celery's ``task-revoked``, with the reason."""
        try:
            self._dispatcher().send(
                "task-revoked",
                uuid=job_id,
                result=f"cancelled: {reason}",
                terminated=False,
                signum=None,
                expired=False,
            )
        except Exception as exc:
            log.debug("cancel event failed for %s: %s", job_id, exc)
            self._local.dispatcher = None


class StepSignals:
    """Progress and cancel for one job, without the GPU thread ever waiting on Redis.

    The GPU thread calls ``progress`` and ``cancelled`` every step: both only touch memory. A
    ``SignalPump`` thread writes the latest progress and reads the cancel key every
    ``interval_s``; ``close`` (on the job's own thread) writes the final progress.
    """

    def __init__(self, client: redis.Redis, job_id: str, publish: Publish | None = None) -> None:
        self.client = client
        self.job_id = job_id
        self.publish = publish
        self._pending: dict[str, float] | None = None
        self._cancelled = False
        self._closed = False
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()

    def progress(self, step: int, total: int) -> None:
        body = {"step": step, "total": total, "fraction": round(step / max(total, 1), 4), "at": time.time()}
        with self._lock:
            self._pending = body

    def cancelled(self) -> bool:
        return self._cancelled

    def flush(self, final: bool = False) -> None:
        """Write pending progress and refresh the cancel flag (best effort: Redis may be down).

        Writes happen under the lock and never after the final flush: a PROGRESS state written
        late would overwrite the job's SUCCESS in the result backend.
        """
        with self._io_lock:
            if self._closed:
                return
            self._closed = final
            with self._lock:
                body, self._pending = self._pending, None
            self._write(body)

    def _write(self, body: dict[str, float] | None) -> None:
        try:
            self._cancelled = self._cancelled or bool(self.client.exists(cancel_key(self.job_id)))
            if body is not None:
                self.client.set(progress_key(self.job_id), json.dumps(body), ex=DAY)
                if self.publish:
                    self.publish(self.job_id, body)
        except redis.RedisError:
            pass  # progress is best effort; the job goes on


class SignalPump:
    """One thread per worker flushing the StepSignals of the running jobs."""

    def __init__(self, client: redis.Redis, interval_s: float, publish: Publish | None = None) -> None:
        self.client = client
        self.interval_s = max(interval_s, 0.01)
        self.publish = publish
        self._jobs: dict[str, StepSignals] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SignalPump:
        self._thread = threading.Thread(target=self._loop, name="sdq-signals", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5.0)

    def open(self, job_id: str) -> StepSignals:
        """Follow a job that starts now; pair with ``close``."""
        signals = StepSignals(self.client, job_id, self.publish)
        with self._lock:
            self._jobs[job_id] = signals
        return signals

    def close(self, signals: StepSignals) -> None:
        with self._lock:
            self._jobs.pop(signals.job_id, None)
        signals.flush(final=True)

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            with self._lock:
                running = list(self._jobs.values())
            for signals in running:
                signals.flush()
