"""One vocabulary for the state of a job, shared by the client, bulk runs, the CLI, the worker's
notifications and its metrics.

Celery's task states map onto it through ``state_of``; a cancel is recognised in one place
(``is_cancellation``), from the exception itself or from its serialised form in the result
backend.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from sdqueue.errors import JobCancelled


class JobState(str, Enum):
    """What a client is told about a job. Serialises as its value (``"succeeded"``)."""

    QUEUED = "queued"
    """Submitted, not started (or started and its first progress not yet written)."""
    RUNNING = "running"
    RETRYING = "retrying"
    """A transient fault; the job runs again after a backoff."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"
    """No record of this job id: never submitted, or its records expired and no manifest exists."""

    @property
    def final(self) -> bool:
        """True when the job will not change state any more."""
        return self in FINAL

    def __str__(self) -> str:
        return self.value


FINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

_CELERY = {
    "PENDING": JobState.QUEUED,
    "RECEIVED": JobState.QUEUED,
    "STARTED": JobState.RUNNING,
    "PROGRESS": JobState.RUNNING,
    "RETRY": JobState.RETRYING,
    "SUCCESS": JobState.SUCCEEDED,
    "FAILURE": JobState.FAILED,
    "REVOKED": JobState.CANCELLED,
}


def is_cancellation(error: Any) -> bool:
    """Whether a failure is a cancel: a JobCancelled, or its JSON form in the result backend."""
    if isinstance(error, JobCancelled):
        return True
    return isinstance(error, dict) and error.get("exc_type") == JobCancelled.__name__


def state_of(celery_state: str | None, result: Any = None, cancel_requested: bool = False) -> JobState:
    """The JobState of a Celery task state plus its result (the exception of a FAILURE).

    ``cancel_requested``: a client asked to cancel the job; an unfinished job reads cancelled
    (a queued one never runs, a running one stops at its next step).
    """
    state = _CELERY.get(celery_state or "PENDING", JobState.QUEUED)
    if state is JobState.FAILED and is_cancellation(result):
        return JobState.CANCELLED
    if cancel_requested and not state.final:
        return JobState.CANCELLED
    return state
