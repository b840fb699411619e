"""Progress as Celery sees it: a PROGRESS state in the result backend (``AsyncResult.info``)
and, for Flower, a repeated ``task-started`` event.

Flower renders only Celery's standard task fields, and ``celery.events.state`` merges the fields
of each event into its task. So progress goes out as ``task-started`` (the state stays STARTED,
and Flower's "Started" filter finds running jobs) carrying ``result="step 12/30"`` (shown in the
task list and on the task page until the job's own result replaces it) and the job's original
start ``timestamp`` (so Flower's started time and runtime stay right). A cancelled job gets a
``task-cancelled`` event with ``result="cancelled: <reason>"``: Flower still shows it FAILURE
(Celery's state of a task that raised), but with the reason beside it. The cost: Flower's
``flower_events_total{type="task-started"}`` counts progress updates too.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

log = logging.getLogger(__name__)


def progress_text(body: dict[str, Any]) -> str:
    """``step 12/30``: what Flower shows as the result of a running job."""
    return f"step {body.get('step')}/{body.get('total')}"


class ProgressPublisher:
    """Publishes progress from the GPU thread; one event dispatcher per thread."""

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._local = threading.local()

    def _dispatcher(self) -> Any:
        dispatcher = getattr(self._local, "dispatcher", None)
        if dispatcher is None:
            connection = self.app.connection_for_write()
            dispatcher = self.app.events.Dispatcher(connection, hostname=self.hostname, enabled=True)
            self._local.dispatcher = dispatcher
        return dispatcher

    def publish(self, job_id: str, body: dict[str, Any], started_at: float | None = None) -> None:
        try:
            self.app.backend.store_result(job_id, body, "PROGRESS")
            fields = {"timestamp": started_at} if started_at else {}
            self._send("task-started", uuid=job_id, result=progress_text(body), **fields, **body)
        except Exception as exc:  # progress is best effort
            log.debug("progress publish failed for %s: %s", job_id, exc)
            self._local.dispatcher = None

    def cancelled(self, job_id: str, reason: str) -> None:
        """Tell Flower why a job was cancelled (its task then fails with JobCancelled)."""
        try:
            self._send("task-cancelled", uuid=job_id, result=f"cancelled: {reason}")
        except Exception as exc:
            log.debug("cancel event failed for %s: %s", job_id, exc)
            self._local.dispatcher = None

    def _send(self, event: str, **fields: Any) -> None:
        self._dispatcher().send(event, **fields)
