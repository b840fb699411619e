"""The worker's result backend: Celery's Redis backend, with what a client may read kept small.

* Failed results carry the error message, capped, never a server traceback (unless
  ``SDQ_RESULT_TRACEBACKS`` turns them on for debugging), and never a refused payload whole: the
  extended fields (``args``/``kwargs``) are dropped when they are over a few KB.
* A job revoked before it ran is stored with the reason ``cancelled before it started`` (what its
  webhook says), not Celery's bare ``revoked``. Celery 5.7 stores that bare reason from two places,
  the revoke control command (for a job not yet running) and the skipped message, one after the
  other, so a client could read either; both go through ``mark_as_revoked``, which says it here.
* An out-of-memory answer from Redis (``OOM command not allowed``) is retried like a lost
  connection, so a finished job's result is stored once memory is free again instead of the job
  reading "running" for ever.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from celery.backends.redis import RedisBackend, SentinelBackend

from sdqueue_worker.outcomes import QUEUED_CANCEL_REASON
from sdqueue_worker.settings import get_worker_settings

MAX_ERROR_CHARS = 2000
MAX_EXTENDED_BYTES = 4096


def cap(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Cut ``text`` to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text) - limit} more characters]"


def is_oom(exc: BaseException) -> bool:
    """Redis at maxmemory refusing a write (redis-py drops the "OOM" prefix from the message)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith("OOM")
    )


def _small(value: Any) -> bool:
    try:
        return len(json.dumps(value, default=str)) <= MAX_EXTENDED_BYTES
    except (TypeError, ValueError, RecursionError):
        return False


class _WorkerResults(RedisBackend):  # type: ignore[misc]
    """Capped errors, no tracebacks for clients, and OOM retries, over a Redis result backend."""

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return bool(super().exception_safe_to_retry(exc)) or is_oom(exc)

    def mark_as_revoked(
        self, task_id: str, reason: str = "", request: Any = None, store_result: bool = True, **kw: Any
    ) -> Any:
        if reason == "revoked":
            reason = QUEUED_CANCEL_REASON
        return super().mark_as_revoked(task_id, reason, request=request, store_result=store_result, **kw)

    def prepare_exception(self, exc: BaseException, serializer: Any = None) -> Any:
        prepared = super().prepare_exception(exc, serializer)
        if isinstance(prepared, dict):
            message = prepared.get("exc_message")
            parts = message if isinstance(message, (list, tuple)) else [message]
            prepared["exc_message"] = [cap(part) if isinstance(part, str) else part for part in parts]
        return prepared

    def _get_result_meta(
        self, result: Any, state: str, traceback: Any, request: Any, *args: Any, **kw: Any
    ) -> Any:
        if not get_worker_settings().result_tracebacks:
            traceback = None
        meta = super()._get_result_meta(result, state, traceback, request, *args, **kw)
        for field in ("args", "kwargs"):
            if field in meta and not _small(meta[field]):
                meta[field] = None
        return meta


class WorkerRedisBackend(_WorkerResults, RedisBackend):  # type: ignore[misc]
    """The worker's result backend on a plain ``redis://``/``rediss://`` URL."""


class WorkerSentinelBackend(_WorkerResults, SentinelBackend):  # type: ignore[misc]
    """The worker's result backend on a ``sentinel://`` URL (Redis high availability)."""


def backend_url(redis_url: str) -> str:
    """The ``result_backend`` setting naming the worker's backend class for this Redis URL."""
    cls = "WorkerSentinelBackend" if redis_url.startswith("sentinel://") else "WorkerRedisBackend"
    return f"sdqueue_worker.backend:{cls}+{redis_url}"
