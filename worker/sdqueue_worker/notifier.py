"""``sdqueue notifier``: the CPU-only Celery worker that delivers webhooks (queue ``sdqueue.notify``).

``celery -A sdqueue_worker.notifier worker --queues sdqueue.notify`` (``sdqueue notifier`` adds the
flags). It never imports torch nor loads the model, and the GPU worker does not consume this
queue, so a receiver that takes seconds to answer never holds a GPU job slot. Threads pool:
``SDQ_NOTIFY_CONCURRENCY`` deliveries at once (each waits at most ``SDQ_WEBHOOK_TIMEOUT_S``).

Each delivery POSTs the body signed per Standard Webhooks (see sdqueue.webhooks) and retries with
exponential backoff (SDQ_WEBHOOK_MAX_ATTEMPTS tries). Retries wait in Redis as messages, so they
survive a notifier restart. Only 5xx, 408, 429 and network errors are retried (after
``Retry-After`` seconds if the receiver asks for longer); other answers are final. Redirects are
not followed. Delivery is at least once, with a stable ``webhook-id``.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from typing import Any

from celery import Task, signals

from sdqueue.celeryconfig import make_celery
from sdqueue.errors import JobValidationError
from sdqueue.names import NOTIFY_TASK
from sdqueue.webhooks import check_webhook_url, service_netlocs, signed_headers
from sdqueue_worker import logs
from sdqueue_worker.backoff import backoff_s
from sdqueue_worker.metrics import NOTIFICATIONS
from sdqueue_worker.readiness import keep_ready_file
from sdqueue_worker.settings import get_worker_settings

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 429}
settings = get_worker_settings()
app = make_celery(settings, "sdqueue-notifier")
logs.install(settings.log_format, "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx answer becomes an HTTPError: never follow it to another host


_OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


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
    backoff = backoff_s(attempt, settings.webhook_backoff_s, settings.webhook_backoff_max_s)
    return max(backoff, min(asked_s, settings.webhook_backoff_max_s))


@app.task(bind=True, name=NOTIFY_TASK, ignore_result=True, acks_late=True)
def deliver_webhook(self: Task, url: str, body: str, msg_id: str) -> int:
    """POST one signed webhook; retried with exponential backoff on 5xx, 408, 429 and network errors."""
    try:
        check_webhook_url(
            url, settings.webhook_hosts, service_netlocs([settings.redis_url.get_secret_value()])
        )
    except JobValidationError as exc:
        NOTIFICATIONS.labels("webhook", "refused").inc()
        log.warning("webhook %s not sent: %s", msg_id, exc)
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


@signals.worker_init.connect
def _serve_metrics(**_: Any) -> None:
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(int(settings.metrics_port), addr=settings.metrics_addr)
        log.info("notifier metrics on %s:%s/metrics", settings.metrics_addr, settings.metrics_port)


keep_ready_file(settings.ready_file)
