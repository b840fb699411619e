"""Completion notifications for web backends: a Celery callback task and a signed HTTP webhook.

When a job task ends for good (succeeded after its manifest is written, failed, or cancelled;
never on a retry), the worker sends the data ``{job_id, state, result | error}``:

* to ``callback_task`` on ``callback_queue`` (default ``celery``): a task of the web backend's
  own Celery worker, called with those keys as keyword arguments;
* to ``webhook_url`` through the ``sdqueue.notify`` task on its own queue. That task POSTs the
  body signed per Standard Webhooks (see sdqueue.webhooks) and retries with exponential backoff
  (SDQ_WEBHOOK_MAX_ATTEMPTS tries). Retries wait in Redis as messages, so they survive a worker
  restart, and the GPU thread never waits on a slow receiver. Only 5xx, 408, 429 and network
  errors are retried (after ``Retry-After`` seconds if the receiver asks for longer); other
  answers are final. Redirects are not followed.

Delivery is at least once: a redelivered job may notify twice, with the same ``webhook-id``.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

from celery import Task, signals

from sdqueue.errors import JobCancelled, JobValidationError
from sdqueue.names import NOTIFY_QUEUE, NOTIFY_TASK
from sdqueue.states import JobState
from sdqueue.webhooks import check_webhook_url, signed_headers, webhook_id
from sdqueue_worker.app import app
from sdqueue_worker.backoff import backoff_s
from sdqueue_worker.metrics import NOTIFICATIONS
from sdqueue_worker.outcomes import JOB_TASKS, outcome_of
from sdqueue_worker.settings import get_worker_settings

log = logging.getLogger(__name__)
DEFAULT_CALLBACK_QUEUE = "celery"
RETRYABLE_STATUS = {408, 429}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx answer becomes an HTTPError: never follow it to another host


_OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


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


def _post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int, float]:
    """POST once; returns the status and the Retry-After seconds the receiver asked for (or 0)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return int(response.status), 0.0
    except urllib.error.HTTPError as exc:
        retry_after = str(exc.headers.get("Retry-After", "") if exc.headers else "")
        return int(exc.code), float(retry_after) if retry_after.strip().isdigit() else 0.0


def _retry_delay(attempt: int, asked_s: float) -> float:
    """Exponential backoff with jitter, or the receiver's Retry-After if longer (both capped)."""
    settings = get_worker_settings()
    backoff = backoff_s(attempt, settings.webhook_backoff_s, settings.webhook_backoff_max_s)
    return max(backoff, min(asked_s, settings.webhook_backoff_max_s))


@app.task(bind=True, name=NOTIFY_TASK, ignore_result=True, acks_late=True)
def deliver_webhook(self: Task, url: str, body: str, msg_id: str) -> int:
    """POST one signed webhook; retried with exponential backoff on 5xx, 408, 429 and network errors."""
    settings = get_worker_settings()
    try:
        check_webhook_url(url, settings.webhook_hosts)
    except JobValidationError as exc:
        NOTIFICATIONS.labels("webhook", "refused").inc()
        log.error("webhook %s not sent: %s", msg_id, exc)
        return 0
    if settings.webhook_secret is None:
        NOTIFICATIONS.labels("webhook", "refused").inc()
        log.error("webhook %s not sent: set SDQ_WEBHOOK_SECRET (webhooks are always signed)", msg_id)
        return 0
    payload = body.encode()
    headers = signed_headers(settings.webhook_secret.get_secret_value(), msg_id, payload)
    try:
        status, asked_s = _post(url, payload, headers, settings.webhook_timeout_s)
        reason = f"HTTP {status}"
    except (urllib.error.URLError, OSError) as exc:
        status, asked_s, reason = 0, 0.0, f"{type(exc).__name__}: {exc}"
    if 200 <= status < 300:
        NOTIFICATIONS.labels("webhook", "sent").inc()
        return status
    attempt = int(self.request.retries or 0)
    retryable = status == 0 or status >= 500 or status in RETRYABLE_STATUS
    if retryable and attempt + 1 < settings.webhook_max_attempts:
        NOTIFICATIONS.labels("webhook", "retried").inc()
        log.warning("webhook %s to %s: %s; retry %d", msg_id, url, reason, attempt + 1)
        raise self.retry(
            countdown=_retry_delay(attempt, asked_s), max_retries=settings.webhook_max_attempts - 1
        )
    NOTIFICATIONS.labels("webhook", "failed").inc()
    log.error("webhook %s to %s failed after %d attempt(s): %s", msg_id, url, attempt + 1, reason)
    return status


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
