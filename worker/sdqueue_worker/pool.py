"""The worker's pool: Celery's threads pool, with ``revoke(id, terminate=True)`` honoured.

A thread cannot be killed, so Celery's threads pool answers a terminate with
``NotImplementedError … kill_job`` while the job runs on to SUCCESS. Here a terminate needs no
kill: every revoke (with or without terminate, from Flower or any Celery client) lands in
Celery's in-process ``revoked`` set, which the job's step check reads (sdqueue_worker.tasks), so
the job stops at its next denoising step and ends cancelled. A cold shutdown (SIGQUIT) also
calls ``terminate_job``; its jobs are stopped by the consumer (sdqueue_worker.consumer) and go
back to the queue.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.concurrency.thread import TaskPool as ThreadTaskPool

log = logging.getLogger(__name__)


class TaskPool(ThreadTaskPool):  # type: ignore[misc]
    """Threads pool whose terminate is the job's cancel (at its next step)."""

    def terminate_job(self, pid: Any, signal: Any = None) -> None:
        log.info("terminate requested: the job stops at its next step")
