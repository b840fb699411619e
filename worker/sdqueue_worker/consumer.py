"""Every message on sdqueue's queues gets a final result, also one Celery cannot read.

Celery's consumer drops a message whose body cannot be decoded (a 5,000-digit integer, JSON
nested 100,000 deep) or that it finds invalid, with a log line and no result: the job would read
"queued" for ever. This consumer stores a FAILURE with a short message for it first, under the
message's task id when one can be found (headers, correlation id, or the raw body) and matches
the job-id pattern. Log lines are capped: a payload is never logged whole.

On a cold shutdown (SIGQUIT, a second Ctrl+C) it also stops the running jobs at their next
denoising step, so that their messages go back to the queue (sdqueue_worker.tasks) instead of
the jobs running on to their end; ``JobRequest`` puts them at the front of their queue.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery.utils.objects import Bunch
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request

from sdqueue.contract import is_valid_job_id
from sdqueue.errors import JobValidationError, StartupError
from sdqueue_worker.backend import cap
from sdqueue_worker.state import get_state
from sdqueue_worker.strategy import SDQUEUE_TASKS

log = logging.getLogger(__name__)
_RAW_ID = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9._:-]{1,128})"')


def message_id(message: Any) -> str | None:
    """The task id of a message, without decoding its body; None when it has no usable one."""
    candidates = [
        (message.headers or {}).get("id"),
        (message.properties or {}).get("correlation_id"),
    ]
    body = message.body if isinstance(message.body, bytes) else str(message.body or "").encode()
    found = _RAW_ID.search(body[:65536])
    candidates.append(found.group(1).decode() if found else None)
    for candidate in candidates:
        if isinstance(candidate, str) and is_valid_job_id(candidate):
            return candidate
    return None


def jobs_interrupted() -> bool:
    """True once this process's cold shutdown has stopped its jobs."""
    try:
        return get_state().executor.interrupted
    except StartupError:
        return False


def hand_back_first(message: Any) -> bool:
    """Put an unacknowledged message back at the front of its queue, where kombu's restore of a
    dead worker's messages puts them; False where that cannot be done (then reject it)."""
    restore = getattr(getattr(message.channel, "qos", None), "restore_by_tag", None)
    if restore is None:  # not kombu's Redis transport
        return False
    try:
        restore(message.delivery_tag, leftmost=False)
        message.ack()  # the restore removed it from unacked; this forgets the delivery tag
    except Exception as exc:  # a second restore finds nothing in unacked: a reject is safe now
        log.warning("could not hand back message %s at the front of its queue: %s", message.delivery_tag, exc)
        return False
    return True


class JobRequest(Request):  # type: ignore[misc]
    """Celery's request, whose requeue after a cold shutdown puts the message first in line.

    kombu's ``basic_reject(requeue=True)`` pushes it behind the waiting messages, like a new one;
    a job that was already running would then wait for the whole backlog of its lane. (The reason
    a job revoked before it ran is stored with is the result backend's: sdqueue_worker.backend.)
    """

    acknowledged: bool

    def reject(self, requeue: bool = False) -> None:
        if requeue and not self.acknowledged and jobs_interrupted() and hand_back_first(self.message):
            self.acknowledged = True
            self.send_event("task-rejected", requeue=True)
            return
        super().reject(requeue)


def interrupt_jobs() -> None:
    """Stop this process's jobs at their next step; they end with JobInterrupted (not a result)."""
    try:
        executor = get_state().executor
    except StartupError:  # no model loaded yet: no job runs
        return
    log.warning("cold shutdown: running jobs stop at their next step and go back to the queue")
    executor.interrupt()


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, answering undecodable and invalid messages with a FAILURE result, and
    handing running jobs back to the queue on a cold shutdown."""

    def cancel_active_requests(self) -> None:
        """Celery calls this on a cold shutdown only (after ``worker_soft_shutdown_timeout``).

        Celery's cancel asks the pool to kill each running job, which a thread cannot be; here the
        GPU thread stops the jobs instead, and their tasks hand the messages back (``Reject``).
        """
        interrupt_jobs()
        super().cancel_active_requests()

    def _answer(self, message: Any, reason: str) -> None:
        task_id = message_id(message)
        name = (message.headers or {}).get("task")
        log.error(
            "refused message %s (task %s): %s", task_id or "(no usable id)", cap(str(name), 100), reason
        )
        if task_id is None:
            return
        request = Bunch(
            name=name,
            task=name,
            chord=None,
            root_id=None,
            errbacks=None,
            chain=None,
            correlation_id=task_id,
            reply_to=None,
            ignore_result=False,
            delivery_info=None,
        )
        try:
            if self.app.backend.get_state(task_id) != "PENDING":
                return  # never overwrite the outcome of a job that has one
            self.app.backend.mark_as_failure(task_id, JobValidationError(reason), request=request)
        except Exception as exc:  # the result store may be down; the message is dropped either way
            log.warning("could not store the refusal of %s: %s", task_id, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._answer(
            message,
            f"the message body could not be decoded ({cap(str(exc), 200)}); send a JSON body with "
            "the job spec as kwargs (numbers under 4,300 digits, nesting under 1,000 levels)",
        )
        message.ack()

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = cap(str((message.headers or {}).get("task") or (body or {}).get("task")), 100)
        self._answer(
            message,
            f"task {name!r} is not an sdqueue task (NotRegistered); sdqueue's queues take "
            f"{', '.join(sorted(SDQUEUE_TASKS))} only",
        )
        message.reject_log_error(log, self.connection_errors)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._answer(message, cap(str(exc), 500))
        message.reject_log_error(log, self.connection_errors)
