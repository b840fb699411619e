"""Job context on every log record of a job, and opt-in JSON logs (``SDQ_LOG_FORMAT=json``).

Between a job task's ``task_prerun`` and ``task_postrun`` (Celery's own "succeeded" / "raised"
lines included: they are logged before ``task_postrun``), records logged on the job's thread
carry ``job_id``, ``lane``, ``mode`` and ``model``; other records carry them as null. With
``SDQ_LOG_FORMAT=json`` every handler Celery sets up writes one JSON object per line
(python-json-logger): ``{"time", "level", "logger", "message", "job_id", "lane", "mode", "model",
"thread", ...}``; without it the text format is Celery's, unchanged.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import signals

from sdqueue.names import BULK_QUEUE, IMG2IMG_TASK, TXT2IMG_TASK

JOB_FIELDS = ("job_id", "lane", "mode", "model")
MODE_OF_TASK = {TXT2IMG_TASK: "txt2img", IMG2IMG_TASK: "img2img"}
_context = threading.local()


class JobContextFilter(logging.Filter):
    """Adds the running job's fields (or None) to each record that passes a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, str] = getattr(_context, "fields", {})
        for name in JOB_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, fields.get(name))
        return True


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(threadName)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "threadName": "thread"},
        static_fields={},
        reserved_attrs=None,
        timestamp=False,
    )


def configure(logger: logging.Logger, log_format: str) -> None:
    """Put the job filter (and, for ``json``, the JSON formatter) on every handler of ``logger``."""
    for handler in logger.handlers:
        if not any(isinstance(f, JobContextFilter) for f in handler.filters):
            handler.addFilter(JobContextFilter())
        if log_format == "json":
            handler.setFormatter(json_formatter())


def set_job(job_id: str, lane: str, mode: str, model: str) -> None:
    _context.fields = {"job_id": job_id, "lane": lane, "mode": mode, "model": model}


def clear_job() -> None:
    _context.fields = {}


def install(log_format: str, model: str) -> None:
    """Connect the Celery signals of this worker process (called once by the worker's app)."""

    @signals.after_setup_logger.connect(weak=False)
    @signals.after_setup_task_logger.connect(weak=False)
    def _setup(logger: logging.Logger | None = None, **_: Any) -> None:
        if logger is not None:
            configure(logger, log_format)

    @signals.task_prerun.connect(weak=False)
    def _job_started(sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        mode = MODE_OF_TASK.get(getattr(sender, "name", ""))
        if mode and task is not None:
            routing_key = (task.request.delivery_info or {}).get("routing_key")
            set_job(str(task_id), "bulk" if routing_key == BULK_QUEUE else "interactive", mode, model)

    @signals.task_postrun.connect(weak=False)
    def _job_ended(**_: Any) -> None:
        clear_job()
