"""The native API: submit, status, cancel, live events, uploads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, File, Header, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from sdqueue.client import Job
from sdqueue.contract import Img2ImgJob, InpaintJob, Txt2ImgJob
from sdqueue.errors import InputImageError
from sdqueue.server.context import Context, Tenant, context
from sdqueue.server.errors import ERROR_RESPONSES, ApiError
from sdqueue.server.schemas import JobCreated, JobStatus, UploadCreated
from sdqueue.server.status import TERMINAL, sse
from sdqueue.uploads import InputImage, inspect_image

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
Ctx = Annotated[Context, Depends(context)]
LaneParam = Annotated[
    Literal["interactive", "bulk"] | None,
    Query(description="interactive (default) is always served before bulk; a key may be bound to one"),
]


async def tenant(request: Request) -> Tenant:
    ctx: Context = request.app.state.ctx
    return ctx.authenticate(request)


Caller = Annotated[Tenant, Depends(tenant)]


async def submit_job(
    ctx: Context, who: Tenant, spec: Job, lane: str | None, idempotency_key: str | None, charge: bool = True
) -> tuple[str, str, bool]:
    """The contract and allow-list checks, then claim, rate limit, quota and enqueue in one step.
    Returns the job id, its lane, and whether it was queued now (False: submitted before)."""
    lane = ctx.lane_for(who, lane)
    if spec.job_id and idempotency_key and spec.job_id != idempotency_key:
        raise ApiError(
            422, "job_id: differs from the Idempotency-Key header; send one of them", param="job_id"
        )
    if spec.callback_task and not ctx.settings.allow_callbacks:
        raise ApiError(
            422,
            "callback_task: not accepted over HTTP on this server (SDQ_ALLOW_CALLBACKS); use webhook_url",
            param="callback_task",
        )
    job_id = who.job_id(idempotency_key or spec.job_id)
    spec = ctx.queue.validate(spec.model_copy(update={"job_id": job_id}))  # allow-lists before the quota
    if isinstance(spec, Img2ImgJob):
        ctx.check_input(who, spec.image_url)
    if isinstance(spec, InpaintJob):
        ctx.check_input(who, spec.mask_url)
    new = await ctx.submit(who, spec, job_id, lane, charge)
    return job_id, lane, new


@router.post("/jobs", status_code=202, response_model=JobCreated, summary="Submit a job")
async def create_job(
    ctx: Ctx,
    who: Caller,
    job: Annotated[Txt2ImgJob | Img2ImgJob | InpaintJob, Body(discriminator="mode")],
    lane: LaneParam = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Your key for this job: the same key twice gives one job (scoped to your API key)"
        ),
    ] = None,
) -> JSONResponse:
    """Validate a job against the contract and enqueue it; returns at once.

    Refusals name the field (the contract's own messages). The job id is ``{key name}.{Idempotency-Key}``
    (or a random suffix): the same header twice gives one job, and two keys never collide."""
    job_id, chosen, new = await submit_job(ctx, who, job, lane, idempotency_key)
    state = "queued" if new else (await run_in_threadpool(ctx.status.light, job_id))[0]
    body = {
        "job_id": job_id,
        "state": state,
        "lane": chosen,
        "status_url": f"/v1/jobs/{job_id}",
        "events_url": f"/v1/jobs/{job_id}/events",
    }
    return JSONResponse(body, status_code=202)  # already the JobCreated shape: no second validation


@router.get("/jobs/{job_id}", response_model=JobStatus, summary="State, progress, queue position, result")
def get_job(ctx: Ctx, who: Caller, job_id: str) -> JobStatus:
    """State, latest progress, queue position and a rough ETA; when done, images with presigned URLs."""
    return ctx.status.read(ctx.owned_job(who, job_id))


@router.delete("/jobs/{job_id}", status_code=202, response_model=JobStatus, summary="Cancel a job")
def cancel_job(ctx: Ctx, who: Caller, job_id: str) -> JobStatus:
    """A queued job never runs; a running one stops at its next step."""
    ctx.owned_job(who, job_id)
    status = ctx.status.read(job_id, with_queue=False)
    if status.state not in TERMINAL:
        ctx.queue.handle(job_id).cancel()
        ctx.quotas.release(who.name, job_id)
        status = ctx.status.read(job_id, with_queue=False)
    return status


async def _events(ctx: Context, job_id: str) -> AsyncIterator[str]:
    interval, deadline = ctx.settings.sse_interval_s, time.monotonic() + ctx.settings.sse_max_s
    last_state, last_progress, quiet_since = None, None, time.monotonic()
    while time.monotonic() < deadline:
        state, progress = await run_in_threadpool(ctx.status.light, job_id)
        if state in TERMINAL:
            yield sse("done", await run_in_threadpool(ctx.status.read, job_id, False))
            return
        if state != last_state:
            yield sse("state", await run_in_threadpool(ctx.status.read, job_id))
            last_state, quiet_since = state, time.monotonic()
        if progress and progress != last_progress:
            yield sse("progress", progress)
            last_progress, quiet_since = progress, time.monotonic()
        if time.monotonic() - quiet_since > 15:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(interval)
    yield sse("timeout", {"job_id": job_id, "message": "stream limit reached; the job goes on, reconnect"})


@router.get(
    "/jobs/{job_id}/events",
    summary="Server-Sent Events: state, progress ticks, then done",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
def job_events(ctx: Ctx, who: Caller, job_id: str) -> StreamingResponse:
    """``event: state`` (with queue position), ``event: progress`` per denoising tick, and finally
    ``event: done`` with the same body as GET /v1/jobs/{id}."""
    ctx.owned_job(who, job_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_events(ctx, job_id), media_type="text/event-stream", headers=headers)


async def read_upload(ctx: Context, upload: UploadFile, field: str) -> InputImage:
    """The upload's bytes, refused past the size limit while reading, then the image checks."""
    limit = ctx.settings.max_input_bytes
    data = await upload.read(limit + 1)
    try:
        return await run_in_threadpool(inspect_image, data, limit, ctx.settings.max_input_pixels)
    except InputImageError as exc:
        status = 413 if len(data) > limit else 415 if "not a PNG" in str(exc) else 422
        raise ApiError(status, f"{field}: {exc}", param=field) from None


def store_upload(ctx: Context, who: Tenant, image: InputImage) -> UploadCreated:
    if not ctx.settings.input_buckets:
        raise ApiError(422, "file: this server has no input bucket (SDQ_INPUT_BUCKETS)", param="file")
    ref = image.ref(ctx.settings.input_buckets[0], who.upload_prefix)
    ctx.queue.storage.put(ref, image.data, image.content_type)
    return UploadCreated(
        url=ref.url,
        bytes=len(image.data),
        width=image.width,
        height=image.height,
        content_type=image.content_type,
    )


@router.post("/uploads", status_code=201, response_model=UploadCreated, summary="Upload an img2img input")
async def create_upload(ctx: Ctx, who: Caller, file: Annotated[UploadFile, File()]) -> UploadCreated:
    """A PNG, JPEG or WebP within the worker's byte and pixel limits, checked before it is stored; lands in
    the first allow-listed input bucket (content-addressed, under your key's prefix). Use the returned
    ``url`` as a job's ``image_url``."""
    image = await read_upload(ctx, file, "file")
    await run_in_threadpool(ctx.take_token, who)
    return await run_in_threadpool(store_upload, ctx, who, image)
