"""Progress as Celery sees it: a PROGRESS state in the result backend (``AsyncResult.info``)
and a ``task-progress`` event that Flower shows on the task page."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

log = logging.getLogger(__name__)


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

    def publish(self, job_id: str, body: dict[str, Any]) -> None:
        try:
            self.app.backend.store_result(job_id, body, "PROGRESS")
            self._dispatcher().send("task-progress", uuid=job_id, **body)
        except Exception as exc:  # progress is best effort
            log.debug("progress publish failed for %s: %s", job_id, exc)
            self._local.dispatcher = None
