"""How a finished delivery of a job task ended, in the words clients use."""

from __future__ import annotations

from typing import Any

from sdqueue.names import TASK_FOR_MODE

JOB_TASKS = {task: mode for mode, task in TASK_FOR_MODE.items()}
"""Task name -> mode, for the tasks that run jobs (not sdqueue.notify)."""

FINAL = ("succeeded", "failed", "cancelled")


def outcome_of(celery_state: str, retval: Any) -> str | None:
    """succeeded, failed, cancelled or retried for a delivery that ended in ``celery_state``.

    None for states that end nothing (an ignored or rejected delivery comes back later).
    """
    if celery_state == "SUCCESS":
        return "succeeded"
    if celery_state == "RETRY":
        return "retried"
    if celery_state == "REVOKED":
        return "cancelled"
    if celery_state == "FAILURE":
        return "cancelled" if type(retval).__name__ == "JobCancelled" else "failed"
    return None
