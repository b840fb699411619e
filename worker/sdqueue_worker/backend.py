"""The worker's result backend: Celery's Redis backend, with what a client may read kept small.

* Failed results carry the error message, capped, never a server traceback (unless
  ``SDQ_RESULT_TRACEBACKS`` turns them on for debugging), and never a refused payload whole: the
  extended fields (``args``/``kwargs``) are dropped when they are over a few KB.
* An out-of-memory answer from Redis (``OOM command not allowed``) is retried like a lost
  connection, so a finished job's result is stored once memory is free again instead of the job
  reading "running" for ever.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from celery.backends.redis import RedisBackend

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


class WorkerRedisBackend(RedisBackend):  # type: ignore[misc]
    """RedisBackend with capped errors, no tracebacks for clients, and OOM retries."""

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return bool(super().exception_safe_to_retry(exc)) or is_oom(exc)

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
