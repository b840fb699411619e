"""Refuse malformed task messages instead of letting them stop the worker.

Celery's default strategy unpacks a protocol-2 message body as ``(args, kwargs, embed)`` outside
its error handling (celery 5.7 ``Request.__init__``). Measured with a raw client (tests/test_bad_input.py):

* a body that is a string, a number or a 2-item list raises in the consumer: "Unrecoverable
  error", the whole worker stops, and the message, restored on the way down, stops the next
  worker that takes it;
* an ``embed`` that is not an object leaves the job slot busy forever: the worker stops taking
  jobs;
* a ``kwargs`` that is not an object is dropped with a warning and no result.

Any client with broker access could stop every worker that way. Checking the shape first raises
``InvalidTaskError``, which Celery logs ("Received invalid task message") and rejects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker.strategy import default


def _shape(body: Any) -> str:
    if isinstance(body, (list, tuple)):
        return f"[{', '.join(type(item).__name__ for item in body)}]"
    return type(body).__name__


def check_body(message: Any) -> None:
    """Raise InvalidTaskError unless a protocol-2 body is ``[list, dict, dict or null]``."""
    if "task" not in (message.headers or {}):
        return  # protocol 1: Celery reads the task from the body and checks it itself
    body = message.payload
    if isinstance(body, dict) and "args" in body:
        return  # a hybrid message (old clients): Celery converts it
    if not (
        isinstance(body, (list, tuple))
        and len(body) == 3
        and isinstance(body[0], (list, tuple))
        and isinstance(body[1], dict)
        and isinstance(body[2], (dict, type(None)))
    ):
        raise InvalidTaskError(
            f"malformed task message body: expected [args list, kwargs object, embed object], got {_shape(body)}"
        )


def guarded(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy, after a shape check of the message body."""
    handler = default(task, app, consumer, **kwargs)

    def task_message_handler(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **options: Any
    ) -> Any:
        check_body(message)
        return handler(message, body, ack, reject, callbacks, **options)

    return task_message_handler
