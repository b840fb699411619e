"""The deployment's allow-lists applied to a parsed job spec: input bucket, output bucket,
webhook host:port and callback task/queue. The client checks at submit; the worker checks again
once per message (any Celery client can publish), both with this one function."""

from __future__ import annotations

from sdqueue.contract import AnyJob, Img2ImgJob, InpaintJob
from sdqueue.errors import JobValidationError
from sdqueue.locations import ObjectRef, allowed_input
from sdqueue.settings import Settings
from sdqueue.webhooks import check_webhook_url, service_netlocs

DEFAULT_CALLBACK_QUEUE = "celery"


def check_callback(task: str, queue: str | None, settings: Settings) -> None:
    """Refuse a callback task or queue that is not on the deployment's allow-lists."""
    if task not in settings.callback_tasks:
        raise JobValidationError(
            f"callback_task {task!r} is not allowed; allowed: "
            f"{', '.join(settings.callback_tasks) or '(none: set SDQ_CALLBACK_TASKS)'}"
        )
    queue = queue or DEFAULT_CALLBACK_QUEUE
    if queue not in settings.callback_queues:
        raise JobValidationError(
            f"callback_queue {queue!r} is not allowed; allowed: "
            f"{', '.join(settings.callback_queues) or '(none: set SDQ_CALLBACK_QUEUES)'}"
        )


def mask_input(spec: AnyJob, settings: Settings) -> ObjectRef | None:
    """The allow-listed mask object of an inpaint job (checked like ``image_url``), else None."""
    if isinstance(spec, InpaintJob):
        return allowed_input(spec.mask_url, settings.s3_endpoint_url, settings.input_buckets)
    return None


def check_job(spec: AnyJob, settings: Settings) -> ObjectRef | None:
    """Apply every allow-list to ``spec``; returns the input object of an img2img/inpaint job."""
    if spec.output is not None and spec.output.bucket not in settings.allowed_output_buckets:
        raise JobValidationError(
            f"output.bucket: {spec.output.bucket!r} is not an allowed output bucket "
            f"({', '.join(settings.allowed_output_buckets)})"
        )
    if spec.webhook_url is not None:
        forbidden = service_netlocs([settings.redis_url.get_secret_value()])
        check_webhook_url(spec.webhook_url, settings.webhook_hosts, forbidden)
    if spec.callback_task is not None:
        check_callback(spec.callback_task, spec.callback_queue, settings)
    mask_input(spec, settings)
    if isinstance(spec, Img2ImgJob):
        return allowed_input(spec.image_url, settings.s3_endpoint_url, settings.input_buckets)
    return None
