"""Refuse malformed task messages instead of letting them stop the worker.

Celery's default strategy unpacks a protocol-2 message body as ``(args, kwargs, embed)`` outside
its error handling (celery 5.7 ``Request.__init__``). Measured with a raw client (tests/test_bad_input.py):

* a body that is a string, a number or a 2-item list raises in the consumer: "Unrecoverable
  error", the whole worker stops, and the message, restored on the way down, stops the next
  worker that takes it;
* an ``embed`` that is not an object leaves the job slot busy forever: the worker stops taking
  jobs;
* a ``kwargs`` that is not an object is dropped with a warning and no result.

A message without ``argsrepr``/``kwargsrepr`` headers (celery-node, a hand-built message) would
show empty arguments in Flower, which reads them from the ``task-received`` event that Celery
fills from those headers; ``fill_reprs`` writes them first, from the checked body: the kwargs as
JSON like sdqueue's producer writes them, with the password of any URL masked, capped at
``REPR_MAX_CHARS``.

Any client with broker access could stop every worker that way. Checking the shape first raises
``InvalidTaskError``; sdqueue's consumer (sdqueue_worker.consumer) stores a FAILURE result with
the reason and rejects the message. The same happens to linked tasks (a message must not make
the worker publish tasks of the sender's choosing) and to Celery's built-in tasks
(``celery.chord_unlock`` would otherwise retry every 0.5 s for ever): only sdqueue's own task
names run on the GPU worker. Unknown names get Celery's own answer, a FAILURE (NotRegistered).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.utils.saferepr import saferepr
from celery.worker.strategy import default

from sdqueue.names import IMG2IMG_TASK, INPAINT_TASK, NOTIFY_TASK, TXT2IMG_TASK
from sdqueue.settings import mask_url
from sdqueue_worker.backend import cap

SDQUEUE_TASKS = frozenset({TXT2IMG_TASK, IMG2IMG_TASK, INPAINT_TASK, NOTIFY_TASK})


def _shape(body: Any) -> str:
    if isinstance(body, (list, tuple)):
        return f"[{', '.join(type(item).__name__ for item in body)}]"
    return type(body).__name__


_LINKS = ("callbacks", "errbacks", "chain", "chord", "link", "link_error")


def check_links(fields: Any) -> None:
    """Refuse linked tasks: a message must not make the worker publish tasks of its choosing."""
    if isinstance(fields, dict) and any(fields.get(name) for name in _LINKS):
        raise InvalidTaskError(
            "linked tasks (callbacks, errbacks, chain, chord) are not accepted on sdqueue's queues; "
            "use the job's callback_task or webhook_url"
        )


def check_body(message: Any) -> None:
    """Raise InvalidTaskError unless a protocol-2 body is ``[list, dict, dict or null]`` without links."""
    if "task" not in (message.headers or {}):
        check_links(message.payload)  # protocol 1: Celery checks the rest of the shape itself
        return
    body = message.payload
    if isinstance(body, dict) and "args" in body:
        check_links(body)
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
    check_links(body[2])


REPR_MAX_CHARS = 1024
"""Celery's own cap on the argument reprs it writes (``app.amqp.kwargsrepr_maxsize``)."""


def _masked(value: Any) -> Any:
    if isinstance(value, str) and "@" in value:
        try:
            return mask_url(value)
        except ValueError:  # not a URL urllib can split
            return value
    return value


def kwargs_repr(kwargs: dict[str, Any]) -> str:
    """The job's kwargs as JSON (as sdqueue's producer writes ``kwargsrepr``), URL passwords masked,
    at most ``REPR_MAX_CHARS`` characters."""
    shown = {str(key): _masked(value) for key, value in kwargs.items()}
    try:
        text = json.dumps(shown, default=str, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = saferepr(shown, REPR_MAX_CHARS)
    return cap(text, REPR_MAX_CHARS)


def fill_reprs(message: Any) -> None:
    """Give a protocol-2 message without ``argsrepr``/``kwargsrepr`` headers ones built from its
    (already checked) body, so Celery's ``task-received`` event shows the job's arguments."""
    headers = message.headers
    body = message.payload
    if not isinstance(headers, dict) or "task" not in headers or not isinstance(body, (list, tuple)):
        return
    if not headers.get("argsrepr"):
        headers["argsrepr"] = cap(saferepr(tuple(body[0]), REPR_MAX_CHARS), REPR_MAX_CHARS)
    if not headers.get("kwargsrepr"):
        headers["kwargsrepr"] = kwargs_repr(body[1])


def refused(task: Any, app: Any) -> Callable[..., Any]:
    """The strategy of a task that is registered (a Celery built-in) but never runs here: the
    message ends FAILED with a reason, once, and is acknowledged."""

    def task_message_handler(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **options: Any
    ) -> Any:
        raise InvalidTaskError(
            f"task {task.name!r} does not run on sdqueue's GPU worker; its queues take "
            f"{', '.join(sorted(SDQUEUE_TASKS))} only"
        )

    return task_message_handler


def guarded(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy, after a shape check of the message body; tasks that are not
    sdqueue's (Celery's built-ins such as celery.chord_unlock) are refused."""
    if task.name not in SDQUEUE_TASKS:
        return refused(task, app)
    handler = default(task, app, consumer, **kwargs)

    def task_message_handler(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **options: Any
    ) -> Any:
        check_body(message)
        fill_reprs(message)
        return handler(message, body, ack, reject, callbacks, **options)

    return task_message_handler
