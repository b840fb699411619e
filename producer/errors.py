"""The one small exception tree shared by the producer and the worker.

* SdqError
  + JobValidationError     bad job spec: permanent, never retried
    - InputImageError      the input image is missing, too large, or not an acceptable image
  + JobIdConflict          a job id was reused with a different spec
  + BrokerUnavailable      Redis cannot be reached (producer side)
  + TransientError         a hiccup worth retrying with backoff (storage, broker)
  + GenerationError        the pipeline failed for this job (e.g. out of GPU memory): permanent
  + JobFailed              raised by the client when a job ended in failure
    - JobCancelled         the job was cancelled
  + WaitTimeout            the client gave up waiting; the job may still finish
"""

from __future__ import annotations


class SdqError(Exception):
    """Base class for all sdqueue errors."""


class JobValidationError(SdqError, ValueError):
    """A job spec breaks the contract; the message says what to fix."""


class InputImageError(JobValidationError):
    """The input image cannot be used (outside the allow-list, missing, too big, not an image)."""


class JobIdConflict(SdqError):
    """The job id was already used for a different spec."""


class BrokerUnavailable(SdqError):
    """The broker (Redis) could not be reached in time."""


class TransientError(SdqError):
    """A temporary fault (storage or broker); the worker retries it with backoff."""


class GenerationError(SdqError):
    """The pipeline failed for this job; retrying the same job would fail again."""


class JobFailed(SdqError):
    """A job ended in failure; ``str(err)`` is the worker's message."""

    def __init__(self, job_id: str, message: str, error_type: str = "") -> None:
        super().__init__(job_id, message, error_type)  # plain args survive Celery's JSON round trip
        self.job_id = job_id
        self.reason = message
        self.error_type = error_type

    def __str__(self) -> str:
        return f"job {self.job_id} failed: {self.reason}"


class JobCancelled(JobFailed):
    """The job was cancelled before it finished."""


class WaitTimeout(SdqError, TimeoutError):
    """Waiting for a job took longer than the caller allowed; the job itself goes on."""


PERMANENT_ERRORS: tuple[type[Exception], ...] = (JobValidationError, GenerationError, JobIdConflict)
