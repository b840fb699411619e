"""One message -> one frozen, typed work item. Everything past this point (runner, GPU hand-off,
notifications) reads the item, never the raw kwargs, and every allow-list is checked here once.

Any Celery client can publish to sdqueue's queues, so nothing in the message is trusted: the task
id must match the job-id pattern (it names the S3 folder), the task name must agree with the
spec's mode, positional arguments are refused with a hint, and the output folder is confined under
``SDQ_OUTPUT_PREFIX``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdqueue.contract import JOB_ID_PATTERN, AnyJob, derived_seed, is_valid_job_id, parse_job
from sdqueue.errors import JobValidationError
from sdqueue.locations import ObjectRef
from sdqueue.names import is_bulk_queue
from sdqueue.policy import DEFAULT_CALLBACK_QUEUE, check_job, mask_input
from sdqueue_worker.outcomes import JOB_TASKS
from sdqueue_worker.settings import WorkerSettings

Job = AnyJob
MAX_SHOWN = 80


def shown(value: object) -> str:
    """``repr`` of an untrusted value, cut short: errors and logs never echo a payload whole."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text)} chars)"


@dataclass(frozen=True)
class Callbacks:
    """Where the job's end is announced (already allow-listed)."""

    task: str | None = None
    queue: str = DEFAULT_CALLBACK_QUEUE
    webhook_url: str | None = None

    def __bool__(self) -> bool:
        return bool(self.task or self.webhook_url)


@dataclass(frozen=True)
class WorkItem:
    """A message the worker has checked: what the runner, the GPU thread and notifications use."""

    job_id: str
    spec: Job
    input_ref: ObjectRef | None
    folder: ObjectRef
    seeds: tuple[int, ...]
    lane_rank: int
    callbacks: Callbacks
    mask_ref: ObjectRef | None = None

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def manifest_ref(self) -> ObjectRef:
        return ObjectRef(self.folder.bucket, f"{self.folder.key}/manifest.json")


def check_job_id(job_id: Any) -> str:
    """The task id names the job's S3 folder: it must match the job-id pattern."""
    if not isinstance(job_id, str) or not is_valid_job_id(job_id):
        raise JobValidationError(
            f"task id {shown(job_id)}: must match {JOB_ID_PATTERN} (letters, digits, '.', '_', ':', '-', "
            "at most 128 characters); send a valid id"
        )
    return job_id


def output_folder(spec: Job, job_id: str, settings: WorkerSettings) -> ObjectRef:
    """``{SDQ_OUTPUT_PREFIX}/{output.prefix}/{job_id}``: a job's prefix is a sub-folder of the
    configured one, so no job writes into inputs/, the bucket root or another prefix."""
    bucket = spec.output.bucket if spec.output else settings.output_bucket
    parts = [settings.output_prefix.strip("/"), spec.output.prefix if spec.output else "", job_id]
    return ObjectRef(bucket, "/".join(part for part in parts if part))


def job_seeds(spec: Job, job_id: str) -> tuple[int, ...]:
    """Seed of each image: the job's seed (or one derived from its id) plus the image index."""
    base = spec.seed if spec.seed is not None else derived_seed(job_id)
    return tuple((base + index) % (2**63) for index in range(spec.num_images))


def parse_message(
    task_name: str,
    job_id: Any,
    args: Any,
    kwargs: dict[str, Any],
    routing_key: str | None,
    settings: WorkerSettings,
) -> WorkItem:
    """Check a job message whole; raise JobValidationError (permanent) naming what to fix."""
    job_id = check_job_id(job_id)
    if args:
        raise JobValidationError(
            f"{len(args)} positional argument(s) sent; send the job spec as keyword arguments (kwargs)"
        )
    mode = JOB_TASKS.get(task_name)
    if mode is None:
        raise JobValidationError(f"task {shown(task_name)} is not an sdqueue job task")
    if "mode" in kwargs and kwargs["mode"] != mode:
        raise JobValidationError(f"mode: {shown(kwargs['mode'])} sent to the {mode} task {task_name}")
    spec = parse_job({**kwargs, "mode": mode})
    if spec.job_id is not None and spec.job_id != job_id:
        raise JobValidationError(
            f"job_id: {spec.job_id!r} differs from the task id {job_id!r}; send them equal"
        )
    input_ref = check_job(spec, settings)
    if spec.model != settings.model_alias:
        raise JobValidationError(
            f"model: this worker serves {settings.model_alias or 'the default model'}, the job names "
            f"{spec.model or 'no model'}; submit through the client, which routes by alias"
        )
    return WorkItem(
        job_id=job_id,
        spec=spec,
        input_ref=input_ref,
        folder=output_folder(spec, job_id, settings),
        seeds=job_seeds(spec, job_id),
        lane_rank=1 if is_bulk_queue(routing_key) else 0,
        callbacks=Callbacks(
            spec.callback_task, spec.callback_queue or DEFAULT_CALLBACK_QUEUE, spec.webhook_url
        ),
        mask_ref=mask_input(spec, settings),
    )
