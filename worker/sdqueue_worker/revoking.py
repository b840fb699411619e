"""A cancelled job ends as Celery's own REVOKED state, with its reason, once.

A task that raised ``JobCancelled`` would end FAILURE: Flower then shows a cancel with the red
failure badge. Instead the delivery does what Celery's worker does for a revoke
(``Request._announce_revoked`` in celery 5.7): it stores REVOKED with the reason in the result
backend (``TaskRevokedError(reason)``, so ``exc_message[0]`` is the reason), sends a
``task-revoked`` event (Flower shows REVOKED, with ``result="cancelled: <reason>"``) and fires
the ``task_revoked`` signal (the metrics count the cancel there), then raises ``Ignore``: Celery
acknowledges the message and stores, sends and signals nothing more. Every sdqueue reader maps
REVOKED to "cancelled" (``sdqueue.states.state_of``).

A ``revoke(id, terminate=True)`` of a running job already made Celery announce REVOKED
("terminated") when it arrived; the job stops at its next step and then only replaces that
entry and Flower's result with its own reason: the signal (a second count) is not sent again.
"""

from __future__ import annotations

from typing import Any, NoReturn

from celery import Task, signals
from celery.exceptions import Ignore
from celery.worker import state as worker_state

from sdqueue.errors import JobCancelled


def announced_by_celery(job_id: str) -> bool:
    """True when Celery's worker already announced this running request revoked (a terminate)."""
    return job_id not in worker_state.requests


def end_revoked(task: Task, exc: JobCancelled, publisher: Any = None) -> NoReturn:
    """Store REVOKED with the cancel's reason, tell Flower and the signal's receivers, and end the
    delivery without any further state (``Ignore``)."""
    request = task.request
    job_id = str(request.id)
    task.backend.mark_as_revoked(job_id, exc.reason, request=request)
    if publisher is not None:
        publisher.revoked(job_id, exc.reason)
    if not announced_by_celery(job_id):
        signals.task_revoked.send(sender=task, request=request, terminated=False, signum=None, expired=False)
    raise Ignore(f"cancelled: {exc.reason}")
