"""Completion notifications for web backends: a Celery callback task and a signed HTTP webhook.

When a job task ends for good (succeeded after its manifest is written, failed, or cancelled;
never on a retry), the worker sends the data ``{job_id, state, result | error}``:

* to ``callback_task`` on ``callback_queue`` (default ``celery``): a task of the web backend's
  own Celery worker, called with those keys as keyword arguments;
* to ``webhook_url`` through the ``sdqueue.notify`` task on its own queue. The GPU worker only
  publishes that message; ``sdqueue notifier`` (sdqueue_worker.notifier, a CPU-only Celery worker
  that never loads the model) consumes it and POSTs the signed body, so a slow receiver never
  holds a GPU job slot.

Both are one publish to Redis from the job's thread as it ends: nothing here waits on a receiver.

Delivery is at least once: a redelivered job may notify twice, with the same ``webhook-id``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from celery import signals

from sdqueue.errors import JobCancelled
from sdqueue.names import NOTIFY_QUEUE, NOTIFY_TASK
from sdqueue.states import JobState
from sdqueue.webhooks import webhook_id
from sdqueue_worker.app import app
from sdqueue_worker.metrics import NOTIFICATIONS
from sdqueue_worker.outcomes import JOB_TASKS, outcome_of

log = logging.getLogger(__name__)
DEFAULT_CALLBACK_QUEUE = "celery"


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


def send_notifications(spec: dict[str, Any], data: dict[str, Any]) -> None:
    """Publish the callback task and/or the webhook delivery named by a job spec."""
    if spec.get("callback_task"):
        try:
            app.send_task(
                spec["callback_task"], kwargs=data, queue=spec.get("callback_queue") or DEFAULT_CALLBACK_QUEUE
            )
            NOTIFICATIONS.labels("callback", "sent").inc()
        except Exception:
            NOTIFICATIONS.labels("callback", "failed").inc()
            log.exception("could not send callback task %s for job %s", spec["callback_task"], data["job_id"])
    if spec.get("webhook_url"):
        try:
            app.send_task(
                NOTIFY_TASK,
                queue=NOTIFY_QUEUE,
                kwargs={
                    "url": spec["webhook_url"],
                    "body": webhook_body(data),
                    "msg_id": webhook_id(data["job_id"], data["state"]),
                },
            )
        except Exception:
            NOTIFICATIONS.labels("webhook", "failed").inc()
            log.exception("could not queue the webhook for job %s", data["job_id"])


@signals.task_postrun.connect
def _on_job_end(
    sender: Any = None,
    task_id: str | None = None,
    kwargs: dict[str, Any] | None = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    if getattr(sender, "name", "") not in JOB_TASKS or not isinstance(kwargs, dict):
        return
    outcome = outcome_of(state or "", retval)
    if outcome is not None and outcome.final and (kwargs.get("callback_task") or kwargs.get("webhook_url")):
        send_notifications(kwargs, notification_data(str(task_id), outcome, retval))


@signals.task_revoked.connect
def _on_job_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    kwargs = getattr(request, "kwargs", None)
    if getattr(sender, "name", "") in JOB_TASKS and isinstance(kwargs, dict):
        if kwargs.get("callback_task") or kwargs.get("webhook_url"):
            error = JobCancelled(str(request.id), "cancelled before it started")
            send_notifications(kwargs, notification_data(str(request.id), JobState.CANCELLED, error))
