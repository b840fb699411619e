"""One vocabulary: Celery's states and results map onto JobState in one place."""

from __future__ import annotations

import json

import pytest

from sdqueue.errors import GenerationError, JobCancelled
from sdqueue.states import FINAL, JobState, is_cancellation, state_of


@pytest.mark.parametrize(
    ("celery_state", "expected"),
    [
        (None, JobState.QUEUED),
        ("PENDING", JobState.QUEUED),
        ("RECEIVED", JobState.QUEUED),
        ("STARTED", JobState.RUNNING),
        ("PROGRESS", JobState.RUNNING),
        ("RETRY", JobState.RETRYING),
        ("SUCCESS", JobState.SUCCEEDED),
        ("FAILURE", JobState.FAILED),
        ("REVOKED", JobState.CANCELLED),
    ],
)
def test_celery_states(celery_state: str | None, expected: JobState) -> None:
    assert state_of(celery_state) is expected


def test_a_cancel_is_recognised_as_an_exception_and_in_its_stored_form() -> None:
    cancel = JobCancelled(job_id="j", message="cancelled while running")
    assert state_of("FAILURE", cancel) is JobState.CANCELLED
    assert state_of("FAILURE", {"exc_type": "JobCancelled", "exc_message": ["j", "x"]}) is JobState.CANCELLED
    assert state_of("FAILURE", GenerationError("out of memory")) is JobState.FAILED
    assert state_of("FAILURE", {"exc_type": "GenerationError"}) is JobState.FAILED
    assert not is_cancellation("JobCancelled")


def test_a_requested_cancel_wins_only_over_unfinished_states() -> None:
    assert state_of("STARTED", cancel_requested=True) is JobState.CANCELLED
    assert state_of("PENDING", cancel_requested=True) is JobState.CANCELLED
    assert state_of("SUCCESS", cancel_requested=True) is JobState.SUCCEEDED


def test_states_serialise_as_their_values() -> None:
    assert json.dumps({"state": JobState.SUCCEEDED}) == '{"state": "succeeded"}'
    assert JobState.FAILED == "failed" and str(JobState.UNKNOWN) == "unknown"
    assert {state.value for state in FINAL} == {"succeeded", "failed", "cancelled"}
    assert JobState.CANCELLED.final and not JobState.RETRYING.final
