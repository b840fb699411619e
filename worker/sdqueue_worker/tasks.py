"""The job Celery tasks. Thin: the work is in sdqueue_worker.jobs; these add delivery bookkeeping."""

from __future__ import annotations

from typing import Any

from celery import Task, signals
from celery.exceptions import Reject, Retry
from celery.worker import state as worker_state

from sdqueue.errors import PERMANENT_ERRORS, JobCancelled, StartupError, TransientError
from sdqueue.names import IMG2IMG_TASK, INPAINT_TASK, TXT2IMG_TASK, cancel_key
from sdqueue.states import JobState
from sdqueue_worker.app import app
from sdqueue_worker.backoff import backoff_s
from sdqueue_worker.executor import JobInterrupted
from sdqueue_worker.guards import count_delivery, run_lease, uncount_delivery
from sdqueue_worker.jobs import JobContext, result_from_manifest
from sdqueue_worker.notify import announce
from sdqueue_worker.outcomes import QUEUED_CANCEL_REASON
from sdqueue_worker.progress import StepSignals
from sdqueue_worker.revoking import end_revoked
from sdqueue_worker.state import WorkerState, get_state
from sdqueue_worker.work import WorkItem, parse_message


def revoked(job_id: str) -> bool:
    """True once any Celery client sent ``revoke(job_id)`` (with or without terminate) to this worker."""
    return job_id in worker_state.revoked


def _context(task: Task, item: WorkItem, signals: StepSignals, first_start: bool) -> JobContext:
    job_id = item.job_id
    return JobContext(
        submitted_at=task.request.get("sdq_submitted_at"),
        on_progress=signals.progress,
        is_cancelled=lambda: signals.cancelled() or revoked(job_id),
        maybe_done=True,  # also a fresh message: a resubmit after the result TTL must not regenerate
        first_start=first_start,
    )


def outcome_of_error(exc: BaseException) -> JobState:
    return JobState.CANCELLED if isinstance(exc, JobCancelled) else JobState.FAILED


def run_delivery(task: Task, args: tuple[Any, ...], payload: dict[str, Any]) -> dict[str, Any]:
    """Check the message once, run it, and record one final outcome.

    A failure is recorded only while no manifest exists: a worker that wakes up after another
    one finished the same job reports that job's result, and never notifies a second time. A
    job stopped by the worker's cold shutdown records nothing: its message goes back to the
    queue (``Reject(requeue=True)``: no result stored, no webhook, not acknowledged). A
    cancel ends as Celery's REVOKED with its reason (sdqueue_worker.revoking), not as a FAILURE.
    """
    state = get_state()
    routing_key = (task.request.delivery_info or {}).get("routing_key")
    item = parse_message(task.name, task.request.id, args, payload, routing_key, state.settings)
    try:
        result = _run(task, item, state)
    except Retry:
        raise
    except JobInterrupted as exc:
        uncount_delivery(state.redis, item.job_id, int(task.request.retries or 0))
        raise Reject(f"{exc}; the job goes back to the queue", requeue=True) from None
    except Exception as exc:
        finished = state.storage.read_json_quietly(item.manifest_ref)
        if finished is None:
            announce(item, outcome_of_error(exc), exc)
            if isinstance(exc, JobCancelled):
                end_revoked(task, exc, _publisher())
            raise
        result = result_from_manifest(finished)
    announce(item, JobState.SUCCEEDED, result)
    return result


def _run(task: Task, item: WorkItem, state: WorkerState) -> dict[str, Any]:
    """Guard against poison and duplicates, run; transient faults retry with backoff."""
    settings = state.settings
    job_id = item.job_id
    attempt = int(task.request.retries or 0)
    if state.redis.exists(cancel_key(job_id)) or revoked(job_id):
        raise JobCancelled(QUEUED_CANCEL_REASON, job_id)
    starts = count_delivery(state.redis, job_id, attempt, settings.max_deliveries)
    lease_ms = int(settings.visibility_timeout_s * 500)
    with run_lease(state.redis, job_id, lease_ms, state.hostname) as token:
        if token is None:  # another live worker runs this very job: look again later
            raise task.retry(countdown=settings.visibility_timeout_s, max_retries=settings.max_retries)
        with state.lock:
            state.running[job_id] = token
        try:
            signals = state.signals.open(job_id)
            try:
                return state.runner.run(item, _context(task, item, signals, attempt == 0 and starts == 1))
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
def txt2img(self: Task, *args: Any, **payload: Any) -> dict[str, Any]:
    """Generate images from a prompt; kwargs are the job spec (see docs/job-schema.json)."""
    return run_delivery(self, args, payload)


@app.task(bind=True, name=IMG2IMG_TASK, acks_late=True, throws=EXPECTED)
def img2img(self: Task, *args: Any, **payload: Any) -> dict[str, Any]:
    """Transform an allow-listed input image; kwargs are the job spec (see docs/job-schema.json)."""
    return run_delivery(self, args, payload)


@app.task(bind=True, name=INPAINT_TASK, acks_late=True, throws=EXPECTED)
def inpaint(self: Task, *args: Any, **payload: Any) -> dict[str, Any]:
    """Repaint the masked part of an allow-listed input image; kwargs are the job spec."""
    return run_delivery(self, args, payload)


def _publisher() -> Any:
    try:
        return get_state().publisher
    except StartupError:  # not inside a started worker
        return None


@signals.task_prerun.connect
def _job_started(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    publisher = (
        _publisher() if getattr(sender, "name", "") in (TXT2IMG_TASK, IMG2IMG_TASK, INPAINT_TASK) else None
    )
    if publisher is not None:
        publisher.job_started(str(task_id))


@signals.task_postrun.connect
def _job_ended(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    publisher = (
        _publisher() if getattr(sender, "name", "") in (TXT2IMG_TASK, IMG2IMG_TASK, INPAINT_TASK) else None
    )
    if publisher is not None:
        publisher.job_ended(str(task_id))
