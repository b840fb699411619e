"""The job contract: typed job specs with limits, shared by the producer and the worker.

Every limit is checked when a job is submitted and again in the worker, because any Celery
client can publish to the queue without going through this module. Messages name the field
and say what to fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from sdqueue.errors import JobValidationError

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_PIXELS = 1024 * 1024 * 2
MAX_IMAGES = 8
MAX_SEED = 2**63 - 1
MAX_DERIVED_SEED = 2**53 - 1
"""Derived seeds fit in 53 bits: a JSON number any client (JavaScript's included) reads exactly."""
MAX_ERROR_LINES = 8
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
SCHEDULERS = ("default", "euler", "euler_a", "ddim", "dpmpp_2m", "pndm", "unipc")
SchedulerName = Literal["default", "euler", "euler_a", "ddim", "dpmpp_2m", "pndm", "unipc"]
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
TASK_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$"
RESERVED_PREFIX = "sdqueue."

Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8, strict=True)]


class OutputLocation(BaseModel):
    """Where a job's images and manifest go: ``s3://{bucket}/{SDQ_OUTPUT_PREFIX}/{prefix}/{job_id}/``."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(pattern=BUCKET_PATTERN)
    prefix: str = Field(default="", max_length=256, pattern=r"^[A-Za-z0-9._/-]*$")
    """A sub-folder of the worker's SDQ_OUTPUT_PREFIX (never outside it); empty: the prefix itself."""

    @model_validator(mode="after")
    def _clean_prefix(self) -> OutputLocation:
        self.prefix = self.prefix.strip("/")
        if self.prefix and any(part in ("", ".", "..") for part in self.prefix.split("/")):
            raise ValueError("prefix must not contain empty, '.' or '..' segments")
        return self


class _JobBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: int = Field(default=30, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=MAX_GUIDANCE)
    width: Side = 512
    height: Side = 512
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    scheduler: SchedulerName = "default"
    output: OutputLocation | None = None
    job_id: str | None = Field(default=None, pattern=JOB_ID_PATTERN)
    webhook_url: str | None = Field(
        default=None,
        min_length=10,
        max_length=2048,
        pattern=r"^https?://",
        description="Signed POST (Standard Webhooks) when the job ends; host must be in SDQ_WEBHOOK_HOSTS.",
    )
    callback_task: str | None = Field(
        default=None,
        pattern=TASK_NAME_PATTERN,
        description="Celery task of your own worker, sent {job_id, state, result | error} when the job ends.",
    )
    callback_queue: str | None = Field(
        default=None, pattern=TASK_NAME_PATTERN, description="Queue of callback_task (default: celery)."
    )

    @model_validator(mode="after")
    def _check_callback(self) -> _JobBase:
        if self.callback_queue and not self.callback_task:
            raise ValueError("callback_queue: set callback_task too (the task the queue's worker runs)")
        for name in ("callback_task", "callback_queue"):
            if (getattr(self, name) or "").startswith(RESERVED_PREFIX):
                raise ValueError(f"{name}: names starting with {RESERVED_PREFIX!r} belong to sdqueue itself")
        return self

    @model_validator(mode="after")
    def _check_pixels(self) -> _JobBase:
        if self.width * self.height > MAX_PIXELS:
            raise ValueError(
                f"width x height = {self.width * self.height} pixels is over the limit of {MAX_PIXELS}; "
                "lower width or height"
            )
        return self


class Txt2ImgJob(_JobBase):
    """Generate images from a prompt."""

    mode: Literal["txt2img"] = "txt2img"


class Img2ImgJob(_JobBase):
    """Transform an input image (an allow-listed S3 object) guided by a prompt."""

    mode: Literal["img2img"] = "img2img"
    image_url: str = Field(min_length=6, max_length=2048)
    strength: float = Field(default=0.6, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_effective_steps(self) -> Img2ImgJob:
        if int(self.steps * self.strength) < 1:
            raise ValueError(
                f"steps x strength = {self.steps} x {self.strength} runs no denoising step; "
                "raise steps or strength so that their product is at least 1"
            )
        return self


JobSpec = Annotated[Txt2ImgJob | Img2ImgJob, Field(discriminator="mode")]
_JOB_ADAPTER: TypeAdapter[Txt2ImgJob | Img2ImgJob] = TypeAdapter(JobSpec)


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"] if part not in ("txt2img", "img2img"))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field; remove it (see the job schema for accepted fields)"
    return f"{where}: {message}" if where else message


def describe_errors(errors: list[dict[str, Any]]) -> list[str]:
    """pydantic errors of a job spec as the contract words them: ``field: what to fix``.

    The HTTP front door uses it for bodies that FastAPI validated, so both paths say the same."""
    lines = []
    for error in errors:
        if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
            lines.append("mode: must be 'txt2img' or 'img2img'")
        else:
            lines.append(_describe(error))
    return lines


def parse_job(payload: Any) -> Txt2ImgJob | Img2ImgJob:
    """Validate a job payload (a dict with ``mode``) and return the typed spec.

    Raises JobValidationError with one line per problem, naming the field.
    """
    if not isinstance(payload, dict):
        raise JobValidationError(f"a job must be a JSON object, got {type(payload).__name__}")
    if payload.get("mode") not in ("txt2img", "img2img"):
        raise JobValidationError("mode: must be 'txt2img' or 'img2img'")
    try:
        return _JOB_ADAPTER.validate_python(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        lines = [_describe(dict(err))[:300] for err in errors[:MAX_ERROR_LINES]]
        if len(errors) > MAX_ERROR_LINES:
            lines.append(f"... and {len(errors) - MAX_ERROR_LINES} more problems")
        raise JobValidationError("invalid job: " + "; ".join(lines)) from None


def spec_fingerprint(job: Txt2ImgJob | Img2ImgJob) -> str:
    """A stable hash of a spec without its job id: same spec, same fingerprint."""
    body = job.model_dump(mode="json", exclude={"job_id"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def derived_seed(job_id: str) -> int:
    """The seed a job gets when it names none: stable per job id, so a redelivered job
    regenerates the same images; below 2**53, so JSON readers in any language keep it exact."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") & MAX_DERIVED_SEED


def job_json_schema() -> dict[str, Any]:
    """JSON Schema of the task payload (the Celery kwargs) for non-Python producers."""
    return _JOB_ADAPTER.json_schema(mode="validation")


def is_valid_job_id(job_id: str) -> bool:
    return re.fullmatch(JOB_ID_PATTERN, job_id) is not None
