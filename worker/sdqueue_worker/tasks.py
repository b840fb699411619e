"""The two Celery tasks. Thin: the work is in sdqueue_worker.jobs; these add delivery bookkeeping."""

from __future__ import annotations

from typing import Any

from celery import Task

from sdqueue.errors import JobCancelled, TransientError
from sdqueue.names import IMG2IMG_TASK, INPAINT_TASK, TXT2IMG_TASK, cancel_key, is_bulk_queue
from sdqueue_worker.app import app
from sdqueue_worker.backoff import backoff_s
from sdqueue_worker.guards import count_delivery, run_lease
from sdqueue_worker.jobs import JobContext, validate_payload
from sdqueue_worker.progress import StepSignals
from sdqueue_worker.state import get_state


def _context(task: Task, job_id: str, signals: StepSignals) -> JobContext:
    routing_key = (task.request.delivery_info or {}).get("routing_key")
    return JobContext(
        job_id=job_id,
        lane_rank=1 if is_bulk_queue(routing_key) else 0,
        submitted_at=task.request.get("sdq_submitted_at"),
        on_progress=signals.progress,
        is_cancelled=signals.cancelled,
        maybe_done=True,  # also a fresh message: a resubmit after the result TTL must not regenerate
    )


def run_delivery(task: Task, mode: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Validate, guard against poison and duplicates, run; transient faults retry with backoff."""
    state = get_state()
    settings = state.settings
    job_id = str(task.request.id)
    attempt = int(task.request.retries or 0)
    job = validate_payload(mode, payload, job_id, settings)
    if state.redis.exists(cancel_key(job_id)):
        raise JobCancelled(job_id, "cancelled before it started")
    count_delivery(state.redis, job_id, attempt, settings.max_deliveries)
    lease_ms = int(settings.visibility_timeout_s * 500)
    with run_lease(state.redis, job_id, lease_ms, state.hostname) as token:
        if token is None:  # another live worker runs this very job: look again later
            raise task.retry(countdown=settings.visibility_timeout_s, max_retries=settings.max_retries)
        with state.lock:
            state.running[job_id] = token
        try:
            signals = state.signals.open(job_id)
            try:
                return state.runner.run(job, _context(task, job_id, signals))
            finally:
                state.signals.close(signals)
        except TransientError as exc:
            if attempt >= settings.max_retries:  # say so: the message must not promise a retry
                raise TransientError(f"{exc}; gave up after {attempt + 1} attempts") from None
            raise task.retry(
                exc=exc,
                max_retries=settings.max_retries,
                countdown=backoff_s(attempt, settings.retry_backoff_s, settings.retry_backoff_max_s),
            ) from None
        finally:
            with state.lock:
                state.running.pop(job_id, None)


@app.task(bind=True, name=TXT2IMG_TASK, acks_late=True)
def txt2img(self: Task, **payload: Any) -> dict[str, Any]:
    """Generate images from a prompt; kwargs are the job spec (see docs/job-schema.json)."""
    return run_delivery(self, "txt2img", payload)


@app.task(bind=True, name=IMG2IMG_TASK, acks_late=True)
def img2img(self: Task, **payload: Any) -> dict[str, Any]:
    """Transform an allow-listed input image; kwargs are the job spec (see docs/job-schema.json)."""
    return run_delivery(self, "img2img", payload)


@app.task(bind=True, name=INPAINT_TASK, acks_late=True)
def inpaint(self: Task, **payload: Any) -> dict[str, Any]:
    """Repaint the masked part of an allow-listed input image; kwargs are the job spec."""
    return run_delivery(self, "inpaint", payload)
