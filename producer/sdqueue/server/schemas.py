"""Response bodies of the HTTP API (requests are the contract's own models)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sdqueue.contract import MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, SchedulerName

State = Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled", "unknown"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every refusal, in OpenAI's error shape; ``param`` names the field to fix."""

    error: ErrorDetail


class JobCreated(BaseModel):
    job_id: str
    state: State
    lane: Literal["interactive", "bulk"]
    status_url: str
    events_url: str


class Progress(BaseModel):
    step: int
    total: int
    fraction: float
    at: float


class QueueInfo(BaseModel):
    position: int | None = Field(description="Jobs ahead of this one; null when deeper than the scan limit")
    waiting: int = Field(description="Jobs waiting in the lanes this job's worker takes first or with it")


class ImageOut(BaseModel):
    index: int
    seed: int
    url: str = Field(description="s3:// URL")
    http_url: str = Field(description="presigned GET URL")
    width: int
    height: int


class ResultOut(BaseModel):
    images: list[ImageOut]
    manifest_url: str
    timings: dict[str, float]
    model_id: str


class JobStatus(BaseModel):
    job_id: str
    state: State
    progress: Progress | None = None
    queue: QueueInfo | None = None
    eta_s: float | None = Field(default=None, description="Rough seconds until done, from recent jobs")
    result: ResultOut | None = None
    error: str | None = None
    error_type: str | None = None


class UploadCreated(BaseModel):
    url: str = Field(description="s3:// URL to put in a job's image_url")
    bytes: int
    width: int
    height: int
    content_type: str


class Health(BaseModel):
    ok: bool


class ImageGenerationRequest(BaseModel):
    """OpenAI's images.generate body, plus sdqueue's optional extensions (``extra_body``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(default=None, pattern=r"^[0-9]{1,4}x[0-9]{1,4}$", description="WIDTHxHEIGHT")
    response_format: Literal["url", "b64_json"] = "url"
    quality: str | None = Field(default=None, max_length=32, description="accepted, ignored")
    style: str | None = Field(default=None, max_length=32, description="accepted, ignored")
    output_format: Literal["png"] | None = None
    user: str | None = Field(default=None, max_length=256)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=30.0)
    scheduler: SchedulerName | None = None


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str | None = None
    output_format: Literal["png"] = "png"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
