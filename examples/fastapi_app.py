"""A small web backend on sdqueue: submit a job, poll its progress, get result URLs, cancel it,
and receive the signed completion webhook.

Install the producer side only (no torch): ``pip install sdqueue fastapi uvicorn``, set the
``SDQ_*`` environment (Redis URL, S3 endpoint and credentials; ``SDQ_WEBHOOK_SECRET`` for the
webhook), then run::

    uvicorn --factory examples.fastapi_app:create_app

    POST   /jobs            a job spec (docs/job-schema.json) -> 202 {"job_id", "state", "status_url"}
    GET    /jobs/{job_id}   {"state", "progress", "images": [{"url", "seed"}] | "error"}
    DELETE /jobs/{job_id}   cancel -> 202 {"job_id", "state"}
    POST   /webhooks/sdqueue  where a job's webhook_url may point (signature checked)
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import Body, FastAPI, HTTPException, Request, Response

from sdqueue import BrokerUnavailable, JobFailed, JobIdConflict, JobValidationError, SdQueue
from sdqueue.contract import is_valid_job_id
from sdqueue.names import job_claim_key
from sdqueue.webhooks import WebhookSignatureError, verify


def _known(queue: SdQueue, job_id: str) -> None:
    """404 unless this backend submitted the job (every job it submits has a claimed id)."""
    if not is_valid_job_id(job_id) or not queue.redis.exists(job_claim_key(job_id)):
        raise HTTPException(404, f"no job {job_id}")


def create_app(queue: SdQueue | None = None, webhook_secret: str | None = None) -> FastAPI:
    """The FastAPI app; ``queue`` defaults to ``SdQueue()`` (settings from SDQ_* environment)."""
    queue = queue or SdQueue()
    secret = webhook_secret or (
        queue.settings.webhook_secret.get_secret_value() if queue.settings.webhook_secret else None
    )
    app = FastAPI(title="sdqueue example backend")
    app.state.notifications = []

    @app.post("/jobs", status_code=202)
    def submit(
        job: dict[str, Any] = Body(...),  # noqa: B008 (FastAPI declares request bodies this way)
        lane: Literal["interactive", "bulk"] = "interactive",
    ) -> dict[str, Any]:
        spec = {**job, "job_id": job.get("job_id") or uuid.uuid4().hex}
        try:
            handle = queue.submit(spec, lane=lane)
        except JobValidationError as exc:
            raise HTTPException(422, str(exc)) from None
        except JobIdConflict as exc:
            raise HTTPException(409, str(exc)) from None
        except BrokerUnavailable as exc:
            raise HTTPException(503, str(exc)) from None
        return {"job_id": handle.job_id, "state": handle.state(), "status_url": f"/jobs/{handle.job_id}"}

    @app.get("/jobs/{job_id}")
    def status(job_id: str) -> dict[str, Any]:
        _known(queue, job_id)
        handle = queue.handle(job_id)
        body: dict[str, Any] = {"job_id": job_id, "state": handle.state(), "progress": handle.progress()}
        try:
            result = handle.result()
        except JobFailed as exc:
            body["error"] = exc.reason
        else:
            if result is not None:
                urls = queue.presigned_urls(result)
                body["images"] = [
                    {"url": url, "seed": image.seed} for image, url in zip(result.images, urls, strict=False)
                ]
        return body

    @app.delete("/jobs/{job_id}", status_code=202)
    def cancel(job_id: str) -> dict[str, Any]:
        _known(queue, job_id)
        handle = queue.handle(job_id)
        handle.cancel()
        return {"job_id": job_id, "state": handle.state()}

    @app.post("/webhooks/sdqueue", status_code=204)
    async def webhook(request: Request) -> Response:
        if not secret:
            raise HTTPException(503, "set SDQ_WEBHOOK_SECRET to receive webhooks")
        body = await request.body()
        try:
            verify(secret, request.headers, body)
        except WebhookSignatureError as exc:
            raise HTTPException(400, str(exc)) from None
        app.state.notifications.append(await request.json())  # a real app updates its own records here
        return Response(status_code=204)

    return app
