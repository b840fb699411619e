"""How a finished delivery of a job task ended, in the client's JobState words."""

from __future__ import annotations

from typing import Any

from sdqueue.names import TASK_FOR_MODE
from sdqueue.states import JobState, state_of

JOB_TASKS = {task: mode for mode, task in TASK_FOR_MODE.items()}
"""Task name -> mode, for the tasks that run jobs (not sdqueue.notify)."""
QUEUED_CANCEL_REASON = "cancelled before it started"
"""The reason of a job cancelled before its pipeline call began (result, webhook, Flower)."""

ENDS = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.RETRYING})


def outcome_of(celery_state: str, retval: Any) -> JobState | None:
    """SUCCEEDED, FAILED, CANCELLED or RETRYING for a delivery that ended in ``celery_state``.

    None for states that end nothing (an ignored or rejected delivery comes back later).
    """
    state = state_of(celery_state, retval)
    return state if state in ENDS and celery_state else None
