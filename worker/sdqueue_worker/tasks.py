"""The two Celery tasks. Thin: the work is in sdqueue_worker.jobs; these add delivery bookkeeping."""

from __future__ import annotations

from typing import Any

from celery import Task, signals

from sdqueue.errors import PERMANENT_ERRORS, JobCancelled, TransientError
from sdqueue.names import BULK_QUEUE, IMG2IMG_TASK, TXT2IMG_TASK, cancel_key
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
        lane_rank=1 if routing_key == BULK_QUEUE else 0,
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


EXPECTED = (*PERMANENT_ERRORS, JobCancelled)
"""Refusals and cancels: Celery logs them at INFO ("raised expected"), without a traceback."""


@app.task(bind=True, name=TXT2IMG_TASK, acks_late=True, throws=EXPECTED)
def txt2img(self: Task, **payload: Any) -> dict[str, Any]:
    """Generate images from a prompt; kwargs are the job spec (see docs/job-schema.json)."""
    return run_delivery(self, "txt2img", payload)


@app.task(bind=True, name=IMG2IMG_TASK, acks_late=True, throws=EXPECTED)
def img2img(self: Task, **payload: Any) -> dict[str, Any]:
    """Transform an allow-listed input image; kwargs are the job spec (see docs/job-schema.json)."""
    return run_delivery(self, "img2img", payload)


def _publisher() -> Any:
    try:
        return get_state().publisher
    except RuntimeError:  # not inside a started worker
        return None


@signals.task_prerun.connect
def _job_started(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    publisher = _publisher() if getattr(sender, "name", "") in (TXT2IMG_TASK, IMG2IMG_TASK) else None
    if publisher is not None:
        publisher.job_started(str(task_id))


@signals.task_postrun.connect
def _job_ended(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    publisher = _publisher() if getattr(sender, "name", "") in (TXT2IMG_TASK, IMG2IMG_TASK) else None
    if publisher is not None:
        publisher.job_ended(str(task_id))


@signals.task_failure.connect
def _tell_flower_why(sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any) -> None:
    """A cancelled job's reason, as the Result Flower shows beside its FAILURE state."""
    publisher = _publisher() if isinstance(exception, JobCancelled) else None
    if publisher is not None and getattr(sender, "name", "") in (TXT2IMG_TASK, IMG2IMG_TASK):
        publisher.cancelled(str(task_id), exception.reason)
