"""sdqueue producer: the job contract and the client. Never imports torch."""

from sdqueue.aio import AsyncJobHandle, AsyncSdQueue
from sdqueue.client import ImageResult, JobHandle, JobResult, SdQueue
from sdqueue.contract import Img2ImgJob, InpaintJob, LoraRef, OutputLocation, Txt2ImgJob, parse_job
from sdqueue.errors import (
    BrokerUnavailable,
    GenerationError,
    InputImageError,
    JobCancelled,
    JobFailed,
    JobIdConflict,
    JobNotFound,
    JobValidationError,
    SdqError,
    TransientError,
    WaitTimeout,
)
from sdqueue.settings import Settings, get_settings
from sdqueue.states import JobState

__all__ = [
    "AsyncJobHandle",
    "AsyncSdQueue",
    "BrokerUnavailable",
    "GenerationError",
    "ImageResult",
    "Img2ImgJob",
    "InpaintJob",
    "InputImageError",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobIdConflict",
    "JobNotFound",
    "JobResult",
    "JobState",
    "JobValidationError",
    "LoraRef",
    "OutputLocation",
    "SdQueue",
    "SdqError",
    "Settings",
    "Txt2ImgJob",
    "TransientError",
    "WaitTimeout",
    "get_settings",
    "parse_job",
]
