"""OpenAI-compatible images endpoints: ``images.generate`` and ``images.edit`` of the official SDKs,
answered synchronously (within SDQ_SYNC_TIMEOUT_S) by ordinary sdqueue jobs."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from sdqueue.client import Job
from sdqueue.contract import Img2ImgJob, Txt2ImgJob
from sdqueue.errors import JobValidationError
from sdqueue.locations import ObjectRef
from sdqueue.server.context import Context, Tenant, context
from sdqueue.server.errors import ERROR_RESPONSES, ApiError
from sdqueue.server.routes_jobs import read_upload, store_upload, submit_job, tenant
from sdqueue.server.schemas import ImageData, ImageGenerationRequest, ImagesResponse, JobStatus
from sdqueue.server.status import TERMINAL

router = APIRouter(prefix="/v1/images", responses=ERROR_RESPONSES, tags=["OpenAI-compatible"])
Ctx = Annotated[Context, Depends(context)]
Caller = Annotated[Tenant, Depends(tenant)]
DEFAULT_SIZE = "512x512"


def _size(size: str | None) -> tuple[int, int]:
    width, _, height = (size or DEFAULT_SIZE).partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise ApiError(400, f"size {size!r}: use WIDTHxHEIGHT, e.g. 512x512", param="size")
    return int(width), int(height)


def _model(ctx: Context, model: str | None) -> None:
    if model is not None and model not in ctx.settings.openai_models:
        raise ApiError(
            400,
            f"model {model!r}: this server serves {', '.join(ctx.settings.openai_models)} "
            "(the workers' SDQ_MODEL); pass one of those or leave model out",
            param="model",
            code="model_not_found",
        )


def _build(kind: type[Job], size: str | None, fields: dict[str, Any]) -> Job:
    width, height = _size(size)
    body = {k: v for k, v in fields.items() if v is not None}
    try:
        return kind(width=width, height=height, **body)
    except Exception as exc:  # pydantic's ValidationError: worded as the contract words it
        from pydantic import ValidationError

        from sdqueue.contract import describe_errors

        if not isinstance(exc, ValidationError):
            raise
        lines = describe_errors([dict(e) for e in exc.errors(include_url=False)])
        lines = [
            f"size {size or DEFAULT_SIZE!r} ({line})" if line.startswith(("width", "height")) else line
            for line in lines
        ]
        param = "size" if lines[0].startswith("size") else lines[0].split(":")[0]
        raise ApiError(400, "invalid request: " + "; ".join(lines), param=param) from None


async def _wait(ctx: Context, job_id: str) -> JobStatus:
    """Poll the job (never parking a thread on it) until it ends or the sync timeout passes."""
    deadline = time.monotonic() + ctx.settings.sync_timeout_s
    delay = 0.05
    while time.monotonic() < deadline:
        state, _ = await run_in_threadpool(ctx.status.light, job_id)
        if state in TERMINAL:
            return await run_in_threadpool(ctx.status.read, job_id, False)
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    raise ApiError(
        504,
        f"job {job_id} not finished after {ctx.settings.sync_timeout_s:g}s; it goes on: "
        f"GET /v1/jobs/{job_id} for its result",
        "timeout_error",
        code="timeout",
    )


def _job_error(job_id: str, status: JobStatus) -> ApiError:
    """A job that ended without images: the client's fault (400), cancelled (409) or the worker's (502)."""
    message = f"job {job_id} {status.state}: {status.error or 'no images'}"
    if status.state == "cancelled":
        return ApiError(409, message, code="job_cancelled")
    if status.error_type in ("JobValidationError", "InputImageError"):
        return ApiError(400, message, param="image" if status.error_type == "InputImageError" else None)
    return ApiError(502, message, "server_error", code="job_failed")


async def _respond(ctx: Context, job_id: str, response_format: str, size: str) -> ImagesResponse:
    status = await _wait(ctx, job_id)
    if status.state != "succeeded" or status.result is None:
        raise _job_error(job_id, status)
    data = []
    for image in status.result.images:
        if response_format == "b64_json":
            ref = ObjectRef(*image.url.removeprefix("s3://").split("/", 1))
            raw = await run_in_threadpool(ctx.queue.storage.get, ref)
            data.append(ImageData(b64_json=base64.b64encode(raw).decode()))
        else:
            data.append(ImageData(url=image.http_url))
    return ImagesResponse(created=int(time.time()), data=data, size=size)


async def _run(
    ctx: Context, who: Tenant, spec: Job, response_format: str, size: str | None, charge: bool = True
) -> ImagesResponse:
    try:
        job_id, _, _ = await submit_job(ctx, who, spec, None, None, charge)
    except JobValidationError as exc:
        raise ApiError(400, str(exc), param="image" if "image" in str(exc)[:12] else None) from None
    return await _respond(ctx, job_id, response_format, size or DEFAULT_SIZE)


@router.post("/generations", response_model=ImagesResponse, summary="OpenAI images.generate")
async def generations(ctx: Ctx, who: Caller, body: ImageGenerationRequest) -> ImagesResponse:
    """txt2img, answered when the images are ready. ``steps``, ``seed``, ``negative_prompt``,
    ``guidance_scale`` and ``scheduler`` are sdqueue extensions (the SDKs' ``extra_body``)."""
    _model(ctx, body.model)
    spec = _build(
        Txt2ImgJob,
        body.size,
        {
            "prompt": body.prompt,
            "num_images": body.n,
            "steps": body.steps or ctx.settings.openai_steps,
            "seed": body.seed,
            "negative_prompt": body.negative_prompt,
            "guidance_scale": body.guidance_scale,
            "scheduler": body.scheduler,
        },
    )
    return await _run(ctx, who, spec, body.response_format, body.size)


@router.post("/edits", response_model=ImagesResponse, summary="OpenAI images.edit (img2img)")
async def edits(
    ctx: Ctx,
    who: Caller,
    image: Annotated[UploadFile, File(description="PNG, JPEG or WebP within the worker's limits")],
    prompt: Annotated[str, Form(min_length=1)],
    mask: Annotated[UploadFile | None, File(description="not supported yet: refused")] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form(ge=1, le=8)] = 1,
    size: Annotated[str | None, Form(pattern=r"^[0-9]{1,4}x[0-9]{1,4}$")] = None,
    response_format: Annotated[str, Form(pattern=r"^(url|b64_json)$")] = "url",
    strength: Annotated[float | None, Form(gt=0.0, le=1.0)] = None,
    steps: Annotated[int | None, Form(ge=1, le=150)] = None,
    seed: Annotated[int | None, Form(ge=0)] = None,
) -> ImagesResponse:
    """img2img from an uploaded image (checked like POST /v1/uploads), answered when ready.
    ``strength``, ``steps`` and ``seed`` are sdqueue extensions."""
    if mask is not None:
        raise ApiError(
            400,
            "mask: inpainting is not supported by this sdqueue version; send the image without a mask "
            "for img2img",
            param="mask",
            code="unsupported_mask",
        )
    _model(ctx, model)
    upload = await read_upload(ctx, image, "image")
    await run_in_threadpool(ctx.take_token, who)
    stored = await run_in_threadpool(store_upload, ctx, who, upload)
    fields: dict[str, Any] = {
        "prompt": prompt,
        "num_images": n,
        "image_url": stored.url,
        "strength": strength,
        "steps": steps or ctx.settings.openai_steps,
        "seed": seed,
    }
    spec = _build(Img2ImgJob, size, fields)
    return await _run(ctx, who, spec, response_format, size, charge=False)
