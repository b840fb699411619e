"""The one small exception tree shared by the producer and the worker.

* SdqError
  + JobValidationError      bad job spec: permanent, never retried
    - InputImageError       the input image is missing, too large, or not an acceptable image
  + JobIdConflict           a job id was reused with a different spec
  + TransientError          a hiccup worth retrying with backoff
    - BrokerUnavailable     Redis cannot be reached
    - StorageUnavailable    S3 cannot be reached or answered 5xx / SlowDown
  + StorageRefused          S3 refused an output or manifest write (permissions, bucket): permanent
  + GenerationError         the pipeline failed for this job (e.g. out of GPU memory): permanent
  + JobFailed               raised by the client when a job ended in failure
    - JobCancelled          the job was cancelled
  + WaitTimeout             the client gave up waiting; the job may still finish
  + JobNotFound             no record and no manifest of this job id: never submitted, or forgotten
  + WebhookSignatureError   a received webhook is unsigned, wrongly signed or too old
  + StartupError            the worker cannot start (model, GPU, broker or storage setup)
    - LauncherError         the multi-GPU launcher cannot work out or start its GPUs
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


class TransientError(SdqError):
    """A temporary fault (storage or broker); the worker retries it with backoff."""


class BrokerUnavailable(TransientError):
    """The broker (Redis) could not be reached in time."""


class StorageUnavailable(TransientError):
    """Object storage could not be reached, or answered with a retryable error."""


class StorageRefused(SdqError):
    """Object storage refused a request for good (AccessDenied, NoSuchBucket...): permanent."""


class GenerationError(SdqError):
    """The pipeline failed for this job; retrying the same job would fail again."""


class JobFailed(SdqError):
    """A job ended in failure; ``str(err)`` is the worker's message.

    The message comes first, so a stored result's ``exc_message[0]`` is the reason for every
    error, a cancellation included (plain args survive Celery's JSON round trip).
    """

    def __init__(self, message: str, job_id: str = "", error_type: str = "") -> None:
        super().__init__(message, job_id, error_type)
        self.job_id = job_id
        self.reason = message
        self.error_type = error_type

    def __str__(self) -> str:
        return f"job {self.job_id} failed: {self.reason}"


class JobCancelled(JobFailed):
    """The job was cancelled before it finished."""


class WaitTimeout(SdqError, TimeoutError):
    """Waiting for a job took longer than the caller allowed; the job itself goes on."""


class JobNotFound(SdqError, LookupError):
    """No record of this job id and no manifest where its output would be."""


class WebhookSignatureError(SdqError):
    """A received webhook is unsigned, wrongly signed, or too old."""


class StartupError(SdqError):
    """The worker cannot start; the message says which setting to fix."""


class LauncherError(StartupError):
    """The GPU list could not be worked out, or the worker children could not be started."""


PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    JobValidationError,
    GenerationError,
    JobIdConflict,
    StorageRefused,
)
"""Expected job failures: declared as Celery ``throws`` so they are logged without a traceback."""
