"""Lease keeper: turns kombu's fixed visibility timeout into a liveness lease.

kombu's Redis transport redelivers an unacknowledged message once its entry in
``unacked_index`` is older than the visibility timeout. This bootstep re-stamps the entries of
every message this worker holds every ``lease_refresh_s``, so a live worker keeps its messages
however long a job runs, while a dead worker's messages come back one visibility timeout
(20 s by default) after it stopped, not an hour later. It also renews run leases and writes the
worker heartbeat (Redis key and optional file, for a liveness probe).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import bootsteps

from sdqueue.names import worker_alive_key
from sdqueue_worker.guards import renew_lease
from sdqueue_worker.state import WorkerState, get_state

log = logging.getLogger(__name__)


def refresh_unacked(consumer: Any) -> int:
    """Re-stamp the unacked entries of the messages this worker holds; returns how many."""
    channel = consumer.task_consumer.channel
    tags = list(channel.qos._delivered.keys())
    if tags:
        now = time.time()
        with channel.conn_or_acquire() as client:
            client.zadd(channel.unacked_index_key, {tag: now for tag in tags}, xx=True)
    return len(tags)


def heartbeat(state: WorkerState, held: int) -> None:
    settings = state.settings
    lease_ms = int(settings.visibility_timeout_s * 500)
    with state.lock:
        running = dict(state.running)
    for job_id, token in running.items():
        renew_lease(state.redis, job_id, token, lease_ms)
    body = {
        "pid": os.getpid(),
        "at": time.time(),
        "held": held,
        "running": list(running),
        "batches": state.executor.batches_run,
        "busy_s": round(state.executor.busy_seconds, 3),
        "startup": {name: round(seconds, 2) for name, seconds in state.runtime.startup.items()},
    }
    state.redis.set(
        worker_alive_key(state.hostname), json.dumps(body), ex=max(5, settings.visibility_timeout_s)
    )
    if settings.heartbeat_file:
        Path(settings.heartbeat_file).touch()


class LeaseKeeper(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep running the lease thread while the consumer is connected."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()

    def start(self, parent: Any) -> None:
        self._stop = threading.Event()
        threading.Thread(target=self._loop, args=(parent, self._stop), name="sdq-lease", daemon=True).start()

    def stop(self, parent: Any) -> None:
        self._stop.set()

    shutdown = stop

    @staticmethod
    def _loop(consumer: Any, stop: threading.Event) -> None:
        state = get_state()
        while not stop.wait(state.settings.lease_refresh_s):
            try:
                heartbeat(state, refresh_unacked(consumer))
            except Exception as exc:  # Redis blips must not kill the lease thread
                log.warning("lease refresh failed: %s", exc)
