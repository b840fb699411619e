"""Completion notifications for web backends: a Celery callback task and a signed HTTP webhook.

When a job task ends for good (succeeded after its manifest is written, failed, or cancelled;
never on a retry), the worker sends the data ``{job_id, state, result | error}``:

* to ``callback_task`` on ``callback_queue`` (default ``celery``): a task of the web backend's
  own Celery worker, called with those keys as keyword arguments;
* to ``webhook_url`` through the ``sdqueue.notify`` task on its own queue. The GPU worker only
  publishes that message; ``sdqueue notifier`` (sdqueue_worker.notifier, a CPU-only Celery worker
  that never loads the model) consumes it and POSTs the signed body, so a slow receiver never
  holds a GPU job slot.

Notifications are built from the checked work item (sdqueue_worker.work), so a message the worker
refused announces nothing. A job announces one final outcome: the first delivery to end claims
``sdq:notified:{job_id}``, and a redelivered or woken-up duplicate sends nothing. (Only when Redis
cannot be reached for that claim may a notification go out twice, with the same ``webhook-id``.)
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

import redis
from celery import signals

from sdqueue.errors import JobCancelled, JobValidationError
from sdqueue.names import NOTIFY_QUEUE, NOTIFY_TASK, notified_key
from sdqueue.states import JobState
from sdqueue.webhooks import webhook_id
from sdqueue_worker.app import app
from sdqueue_worker.guards import DAY
from sdqueue_worker.metrics import NOTIFICATIONS
from sdqueue_worker.outcomes import JOB_TASKS, QUEUED_CANCEL_REASON
from sdqueue_worker.settings import get_worker_settings
from sdqueue_worker.state import get_state
from sdqueue_worker.work import Callbacks, WorkItem, parse_message

log = logging.getLogger(__name__)


def notification_data(job_id: str, state: JobState, retval: Any) -> dict[str, Any]:
    """What both channels carry: the job id, its final state, its result or its error."""
    data: dict[str, Any] = {"job_id": job_id, "state": state.value}
    if state is JobState.SUCCEEDED:
        data["result"] = retval
    else:
        message = getattr(retval, "reason", None) or str(retval)
        data["error"] = {"type": type(retval).__name__, "message": message}
    return data


def webhook_body(data: dict[str, Any]) -> str:
    """The JSON body POSTed to the webhook (signed byte for byte)."""
    envelope = {
        "type": f"job.{data['state']}",
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "data": data,
    }
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True, default=str)


def send_notifications(callbacks: Callbacks, data: dict[str, Any]) -> None:
    """Publish the callback task and/or the webhook delivery of a checked work item."""
    if callbacks.task:
        try:
            app.send_task(callbacks.task, kwargs=data, queue=callbacks.queue)
            NOTIFICATIONS.labels("callback", "sent").inc()
        except Exception:
            NOTIFICATIONS.labels("callback", "failed").inc()
            log.exception("could not send callback task %s for job %s", callbacks.task, data["job_id"])
    if callbacks.webhook_url:
        try:
            app.send_task(
                NOTIFY_TASK,
                queue=NOTIFY_QUEUE,
                kwargs={
                    "url": callbacks.webhook_url,
                    "body": webhook_body(data),
                    "msg_id": webhook_id(data["job_id"], data["state"]),
                },
            )
        except Exception:
            NOTIFICATIONS.labels("webhook", "failed").inc()
            log.exception("could not queue the webhook for job %s", data["job_id"])


def first_outcome(job_id: str) -> bool:
    """Claim the job's one final outcome: False when another delivery already announced one."""
    try:
        return bool(get_state().redis.set(notified_key(job_id), "1", nx=True, ex=DAY))
    except redis.RedisError:
        return True  # at least once: better a duplicate (same webhook-id) than a lost notification


def announce(item: WorkItem, state: JobState, retval: Any) -> None:
    """Notify a job's end once, from the checked item (never from raw kwargs)."""
    if item.callbacks and first_outcome(item.job_id):
        send_notifications(item.callbacks, notification_data(item.job_id, state, retval))


@signals.task_revoked.connect
def _on_job_revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    name = getattr(sender, "name", "")
    if name not in JOB_TASKS or request is None:
        return
    try:
        item = parse_message(
            name,
            request.id,
            request.args,
            request.kwargs if isinstance(request.kwargs, dict) else {},
            None,
            get_worker_settings(),
        )
    except JobValidationError:
        return  # a refused message announces nothing: its callbacks were never checked
    reason = "cancelled while running" if terminated else QUEUED_CANCEL_REASON
    announce(item, JobState.CANCELLED, JobCancelled(reason, item.job_id))
