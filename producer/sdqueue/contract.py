"""The job contract: typed job specs with limits, shared by the producer and the worker.

Every limit is checked when a job is submitted and again in the worker, because any Celery
client can publish to the queue without going through this module. Messages name the field
and say what to fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal, get_args

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
SchedulerName = Literal[
    "default",
    "euler",
    "euler_a",
    "euler_karras",
    "heun",
    "lms",
    "lms_karras",
    "ddim",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_karras",
    "dpmpp_sde",
    "dpmpp_sde_karras",
    "pndm",
    "unipc",
    "lcm",
]
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
MODES = ("txt2img", "img2img", "inpaint")
OutputFormat = Literal["png", "webp", "jpeg"]
PNDM_MIN_STEPS = 4
MAX_LORAS = 4
MAX_LORA_SCALE = 4.0
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MODEL_ALIAS_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"
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


def check_pixels(width: int, height: int) -> None:
    """Raise ValueError when an image of this size is over the pixel limit."""
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"width x height = {width * height} pixels is over the limit of {MAX_PIXELS}; lower width or height"
        )


class LoraRef(BaseModel):
    """One adapter a job applies: a name from the worker's LoRA folder and its weight."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(
        pattern=LORA_NAME_PATTERN, description="File stem of a .safetensors adapter in SDQ_LORA_DIR."
    )
    scale: float = Field(default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)


class _JobBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: int = Field(default=30, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=MAX_GUIDANCE)
    width: Side | None = Field(
        default=None, description="Pixels; default: the model's native size (SD 1.x 512, SDXL 1024)."
    )
    height: Side | None = Field(default=None, description="Pixels; default: the model's native size.")
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    scheduler: SchedulerName = "default"
    output: OutputLocation | None = None
    output_format: OutputFormat = Field(default="png", description="Image file format of the outputs.")
    output_quality: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="webp/jpeg quality (default 90); not for png or lossless webp.",
    )
    output_lossless: bool = Field(default=False, description="Lossless webp (output_format webp only).")
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)
    model: str | None = Field(
        default=None,
        pattern=MODEL_ALIAS_PATTERN,
        description="Model alias from SDQ_MODELS; routes the job to that model's workers (default: none).",
    )
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
    def _check_output_options(self) -> _JobBase:
        if self.output_lossless and self.output_format != "webp":
            raise ValueError("output_lossless: only webp has a lossless mode; set output_format to 'webp'")
        if self.output_quality is not None and (self.output_format == "png" or self.output_lossless):
            raise ValueError("output_quality: png and lossless webp have no quality; leave it out")
        if self.scheduler == "pndm" and self.steps < PNDM_MIN_STEPS:
            raise ValueError(f"steps: pndm needs at least {PNDM_MIN_STEPS} steps (its warm-up takes 4)")
        names = [lora.name for lora in self.loras]
        if len(set(names)) != len(names):
            raise ValueError("loras: each adapter may appear once; merge the scales of repeated names")
        return self

    @model_validator(mode="after")
    def _check_pixels(self) -> _JobBase:
        check_pixels(self.width or MIN_SIDE, self.height or MIN_SIDE)
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


class InpaintJob(Img2ImgJob):
    """Repaint the white part of a mask (an allow-listed S3 object the size of the input image)."""

    mode: Literal["inpaint"] = "inpaint"  # type: ignore[assignment]
    mask_url: str = Field(min_length=6, max_length=2048)
    strength: float = Field(default=1.0, gt=0.0, le=1.0)


AnyJob = Txt2ImgJob | Img2ImgJob | InpaintJob
JobSpec = Annotated[AnyJob, Field(discriminator="mode")]
_JOB_ADAPTER: TypeAdapter[AnyJob] = TypeAdapter(JobSpec)
MODEL_FOR_MODE: dict[str, type[AnyJob]] = {
    "txt2img": Txt2ImgJob,
    "img2img": Img2ImgJob,
    "inpaint": InpaintJob,
}


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"] if part not in MODES)
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
            lines.append("mode: must be 'txt2img', 'img2img' or 'inpaint'")
        else:
            lines.append(_describe(error))
    return lines


def parse_job(payload: Any) -> AnyJob:
    """Validate a job payload (a dict with ``mode``) and return the typed spec.

    Raises JobValidationError with one line per problem, naming the field.
    """
    if not isinstance(payload, dict):
        raise JobValidationError(f"a job must be a JSON object, got {type(payload).__name__}")
    if payload.get("mode") not in MODES:
        raise JobValidationError("mode: must be 'txt2img', 'img2img' or 'inpaint'")
    try:
        return _JOB_ADAPTER.validate_python(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        lines = [_describe(dict(err))[:300] for err in errors[:MAX_ERROR_LINES]]
        if len(errors) > MAX_ERROR_LINES:
            lines.append(f"... and {len(errors) - MAX_ERROR_LINES} more problems")
        raise JobValidationError("invalid job: " + "; ".join(lines)) from None


def parse_job_json(text: str | bytes, default_mode: str | None = None) -> AnyJob | None:
    """The job of a JSON object's text when it is valid as it stands, else None (``parse_job`` of
    the parsed object then says why, in the contract's words).

    pydantic parses and validates in one pass (no dict in between); ``default_mode`` is the mode
    of a text that names none, as ``parse_job({"mode": default_mode, **payload})`` would take it."""
    try:
        return _JOB_ADAPTER.validate_json(text)
    except ValidationError as exc:
        model = MODEL_FOR_MODE.get(default_mode or "")
        if model is None or exc.errors(include_url=False)[0]["type"] != "union_tag_not_found":
            return None
    try:
        return model.model_validate_json(text)
    except ValidationError:
        return None


def spec_fingerprint(job: AnyJob) -> str:
    """A stable hash of a spec without its job id: same spec, same fingerprint."""
    body = job.model_dump(mode="json", exclude={"job_id"})
    return text_fingerprint(json.dumps(body, sort_keys=True))


def text_fingerprint(text: str) -> str:
    """The fingerprint of a spec's sorted JSON text (``bulk_json.spec_texts`` makes it in one pass)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def derived_seed(job_id: str) -> int:
    """The seed a job gets when it names none: stable per job id, so a redelivered job
    regenerates the same images; below 2**53, so JSON readers in any language keep it exact."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") & MAX_DERIVED_SEED


def job_json_schema() -> dict[str, Any]:
    """JSON Schema of the task payload (the Celery kwargs) for non-Python producers."""
    return _JOB_ADAPTER.json_schema(mode="validation")


def is_valid_job_id(job_id: str) -> bool:
    return re.fullmatch(JOB_ID_PATTERN, job_id) is not None
