"""The producer-side client: submit jobs, ask their state, wait, read results.

A web backend installs the base package only (no torch) and uses it like this::

    from sdqueue import SdQueue, Txt2ImgJob
    queue = SdQueue()                                   # settings from SDQ_* environment
    handle = queue.submit(Txt2ImgJob(prompt="a lighthouse at dusk", seed=7))
    handle.job_id, handle.state()                       # returns at once
    result = handle.wait(timeout=60)                    # JobResult, or raises JobFailed
    result.images[0].url, queue.presigned_urls(result)  # s3:// and http URLs
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as json_string  # json.dumps of a str
from pathlib import Path
from typing import Any, Literal

import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from sdqueue.celeryconfig import make_celery
from sdqueue.contract import AnyJob, Img2ImgJob, InpaintJob, Txt2ImgJob, parse_job, spec_fingerprint
from sdqueue.errors import (
    BrokerUnavailable,
    JobCancelled,
    JobFailed,
    JobIdConflict,
    JobNotFound,
    JobValidationError,
    WaitTimeout,
)
from sdqueue.locations import ObjectRef, job_folder, manifest_ref
from sdqueue.names import QUEUE_FOR_LANE, TASK_FOR_MODE, cancel_key, job_claim_key, lane_queue, progress_key
from sdqueue.policy import check_job
from sdqueue.redis_conn import redis_client
from sdqueue.settings import Settings, get_settings
from sdqueue.states import JobState, state_of
from sdqueue.uploads import check_size, inspect_image

Job = AnyJob
Lane = Literal["interactive", "bulk"]


@dataclass(frozen=True)
class ImageResult:
    """One generated image: where it is and how it was made."""

    index: int
    seed: int
    url: str
    bucket: str
    key: str
    width: int
    height: int
    nsfw: bool | None = None
    """The worker's safety-checker verdict (None when SDQ_SAFETY_CHECKER is off)."""


@dataclass(frozen=True)
class JobResult:
    """A finished job: its images, the manifest URL and the worker's timings."""

    job_id: str
    mode: str
    images: list[ImageResult]
    manifest_url: str
    timings: dict[str, float]
    model_id: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_task_result(cls, body: dict[str, Any]) -> JobResult:
        images = [
            ImageResult(
                **{k: img[k] for k in ("index", "seed", "url", "bucket", "key", "width", "height")},
                nsfw=img.get("nsfw"),
            )
            for img in body["images"]
        ]
        return cls(
            body["job_id"],
            body["mode"],
            images,
            body["manifest_url"],
            body["timings"],
            body["model_id"],
            body,
        )

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> JobResult:
        """The result of a job read from its manifest (the result-backend entry has expired)."""
        return cls.from_task_result(
            {
                **{
                    key: manifest[key]
                    for key in ("job_id", "mode", "images", "seeds", "manifest_url", "timings")
                },
                "model_id": manifest["model"]["id"],
            }
        )


def job_record(spec: Job, fingerprint: str) -> str:
    """What submit stores under the job's claim key: the spec's fingerprint (idempotency), the
    submit time and, when the job names its own, its output location (to find its manifest)."""
    if spec.output is None:  # json.dumps's text, written directly: bulk writes one per job
        return f'{{"fingerprint": {json_string(fingerprint)}, "at": {time.time()!r}}}'
    output = {"bucket": spec.output.bucket, "prefix": spec.output.prefix}
    return json.dumps({"fingerprint": fingerprint, "at": time.time(), "output": output})


def record_ttl_s(spec: Job, settings: Settings) -> int:
    """The claim of a default-location job lives as long as its result; a job with its own output
    location is remembered longer, because only its record says where its manifest is."""
    if spec.output is None:
        return settings.result_ttl_s
    return max(settings.result_ttl_s, settings.output_record_ttl_s)


def task_message(app: Any, job_id: str, spec: Job, sent_event: bool) -> Any:
    """Celery's protocol-2 message for one job (``app.amqp.create_task_message``): the spec as
    kwargs, with its mode (the worker checks it), and the same kwargs as JSON for Flower."""
    payload = spec.model_dump(mode="json", exclude_none=True)
    return app.amqp.create_task_message(
        job_id,
        TASK_FOR_MODE[spec.mode],
        (),
        payload,
        create_sent_event=sent_event,
        argsrepr="()",
        kwargsrepr=json.dumps(payload),
    )


def publish_job(
    app: Any, producer: Any, job_id: str, spec: Job, queue_name: str, sent_event: bool, retry: bool
) -> None:
    """Publish one job message on ``producer``.

    Built with Celery's own message factory, but without ``send_task``'s per-task result
    subscription: a producer holds no pub/sub state per job (no leak, ~10x faster submits), and
    ``JobHandle.wait`` subscribes only when someone waits.
    """
    message = task_message(app, job_id, spec, sent_event and bool(app.conf.task_send_sent_event))
    app.amqp.send_task_message(
        producer,
        TASK_FOR_MODE[spec.mode],
        message,
        queue=queue_name,
        retry=retry,
        declare=[],
        headers={"sdq_submitted_at": time.time()},
    )


def check_model_alias(model: str | None, known: list[str]) -> None:
    """Refuse a model alias that no deployment serves (its queue would never be consumed)."""
    if model is not None and model not in known:
        served = ", ".join(known) if known else "none: SDQ_MODELS is empty"
        raise JobValidationError(f"model: unknown model alias {model!r}; known aliases: {served}")


class SdQueue:
    """Submit and follow sdqueue jobs. Thread-safe; create one per process."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.celery = make_celery(self.settings, "sdqueue-producer")
        self.redis = redis_client(self.settings, decode_responses=True)
        self._storage: Any = None

    def validate(self, job: Job | dict[str, Any]) -> Job:
        """Check a spec as the worker will (limits, input allow-list, output bucket, webhook and
        callback allow-lists). A model is already valid by construction: only the allow-lists are
        applied to it; a dict is parsed first."""
        spec = job if isinstance(job, (Txt2ImgJob, Img2ImgJob, InpaintJob)) else parse_job(job)
        check_job(spec, self.settings)
        check_model_alias(spec.model, self.settings.models)
        return spec

    def submit(self, job: Job | dict[str, Any], lane: Lane = "interactive") -> JobHandle:
        """Validate and enqueue a job; returns at once. The same job id twice gives one job."""
        spec = self.validate(job)
        if lane not in QUEUE_FOR_LANE:
            raise JobValidationError(f"lane: must be one of {sorted(QUEUE_FOR_LANE)}")
        job_id = spec.job_id or uuid.uuid4().hex
        if not self._claim(job_id, spec):
            return JobHandle(self, job_id)
        self._publish(spec, job_id, lane)
        return JobHandle(self, job_id)

    def _claim(self, job_id: str, spec: Job) -> bool:
        """Record the job (every job: so queued and unknown ids differ); False when this exact
        job was already submitted. A resubmit after the record expired is answered by the worker
        from the job's manifest, without generating again."""
        fingerprint = spec_fingerprint(spec)
        claim = job_record(spec, fingerprint)
        try:
            if self.redis.set(job_claim_key(job_id), claim, nx=True, ex=record_ttl_s(spec, self.settings)):
                return True
            existing = json.loads(self.redis.get(job_claim_key(job_id)) or "{}")
        except redis.RedisError as exc:
            raise BrokerUnavailable(
                f"could not submit job {job_id}: Redis at {self.settings.redis_url_masked} unreachable ({exc})"
            ) from None
        if existing.get("fingerprint") not in (None, fingerprint):
            raise JobIdConflict(f"job id {job_id!r} was already used for a different job; pick a new id")
        return False

    def _publish(self, spec: Job, job_id: str, lane: Lane) -> None:
        try:
            with self.celery.producer_or_acquire() as producer:
                publish_job(
                    self.celery,
                    producer,
                    job_id,
                    spec,
                    lane_queue(lane, spec.model),
                    sent_event=True,
                    retry=True,
                )
        except (OperationalError, redis.RedisError, OSError, RuntimeError) as exc:
            self.redis.delete(job_claim_key(job_id))
            raise BrokerUnavailable(
                f"could not enqueue job {job_id}: Redis at {self.settings.redis_url_masked} unreachable ({exc})"
            ) from None

    def handle(self, job_id: str) -> JobHandle:
        """A handle on an existing job."""
        return JobHandle(self, job_id)

    @property
    def storage(self) -> Any:
        if self._storage is None:
            from sdqueue.storage import Storage

            self._storage = Storage(self.settings)
        return self._storage

    def find_manifest(self, job_id: str, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """A job's manifest, where its record (or the default output location) says it is."""
        output = (record or {}).get("output") or {}
        bucket = output.get("bucket", self.settings.output_bucket)
        folder = job_folder(bucket, self.settings.output_prefix, output.get("prefix", ""), job_id)
        manifest: dict[str, Any] | None = self.storage.read_json(manifest_ref(folder))
        return manifest

    def presigned_urls(self, result: JobResult, expires_s: int | None = None) -> list[str]:
        """Presigned http URLs for a result's images (expiry from settings unless given)."""
        return [self.storage.presign(ObjectRef(img.bucket, img.key), expires_s) for img in result.images]

    def upload_input(self, source: str | os.PathLike[str] | bytes, prefix: str = "uploads") -> str:
        """Check an img2img input (type, bytes, pixels: the worker's limits) and store it in the first
        allow-listed input bucket under a content hash; returns the ``s3://`` URL to put in a job."""
        if not self.settings.input_buckets:
            raise JobValidationError("image_url: SDQ_INPUT_BUCKETS is empty, so no input can be uploaded")
        if isinstance(source, bytes):
            data = source
        else:
            path = Path(source)
            check_size(path.stat().st_size, self.settings.max_input_bytes)
            data = path.read_bytes()
        image = inspect_image(data, self.settings.max_input_bytes, self.settings.max_input_pixels)
        ref = image.ref(self.settings.input_buckets[0], prefix)
        self.storage.put(ref, image.data, image.content_type)
        return ref.url


class JobHandle:
    """A submitted job. Cheap to create from a job id; holds no connection of its own."""

    def __init__(self, queue: SdQueue, job_id: str) -> None:
        self.queue = queue
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r})"

    def _async(self) -> AsyncResult:
        return AsyncResult(self.job_id, app=self.queue.celery)

    def _record(self) -> dict[str, Any] | None:
        body = self.queue.redis.get(job_claim_key(self.job_id))
        record: dict[str, Any] | None = json.loads(body) if body else None
        return record

    def _look(self) -> tuple[JobState, AsyncResult, JobResult | None]:
        """The job's state from its result entry, else its manifest, else its submit record.

        The manifest is read only when the result entry could have expired: no record, or a
        record older than the result TTL.
        """
        async_result = self._async()
        celery_state = async_result.state
        if celery_state == "SUCCESS":
            return JobState.SUCCEEDED, async_result, JobResult.from_task_result(async_result.result)
        if celery_state != "PENDING":
            return state_of(celery_state, async_result.result), async_result, None
        record = self._record()
        if record and time.time() - float(record.get("at", 0)) < self.queue.settings.result_ttl_s:
            return JobState.QUEUED, async_result, None
        manifest = self.queue.find_manifest(self.job_id, record)
        if manifest is not None:
            return JobState.SUCCEEDED, async_result, JobResult.from_manifest(manifest)
        return JobState.UNKNOWN, async_result, None

    def state(self) -> JobState:
        """queued, running, retrying, succeeded, failed, cancelled, or unknown (never submitted,
        or forgotten: no record and no manifest)."""
        state, _, _ = self._look()
        if not state.final and self.queue.redis.exists(cancel_key(self.job_id)):
            return JobState.CANCELLED
        return state

    def progress(self) -> dict[str, Any] | None:
        """Latest denoising progress: ``{"step", "total", "fraction", "at"}``, or None."""
        body = self.queue.redis.get(progress_key(self.job_id))
        return json.loads(body) if body else None

    def result(self) -> JobResult | None:
        """The result if the job succeeded; raises JobFailed if it failed; None otherwise."""
        state, async_result, result = self._look()
        if state in (JobState.FAILED, JobState.CANCELLED):
            raise self._failure(async_result)
        return result

    def wait(self, timeout: float | None = 300.0) -> JobResult:
        """Block until the job ends; returns its result or raises JobFailed, WaitTimeout (a
        TimeoutError: the job goes on) or JobNotFound (an id with no record and no manifest)."""
        state, async_result, result = self._look()
        if state is JobState.UNKNOWN:
            raise JobNotFound(f"job {self.job_id}: no such job (never submitted, or forgotten: no manifest)")
        if not state.final:
            try:
                async_result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False, interval=0.05)
            except (CeleryTimeoutError, TimeoutError):
                raise WaitTimeout(f"job {self.job_id} not finished after {timeout}s; it goes on") from None
            result = self.result()
        elif state is not JobState.SUCCEEDED:
            raise self._failure(async_result)
        assert result is not None
        return result

    def _failure(self, async_result: AsyncResult) -> JobFailed:
        error = async_result.result
        message = error.reason if isinstance(error, JobFailed) else str(error)
        if state_of(async_result.state, error) is JobState.CANCELLED:  # REVOKED: its message is the reason
            reason = message if error is not None and message else "cancelled"
            return JobCancelled(job_id=self.job_id, message=reason, error_type="JobCancelled")
        return JobFailed(job_id=self.job_id, message=message, error_type=type(error).__name__)

    def cancel(self) -> None:
        """Cancel: a queued job never runs; a running one stops at its next step."""
        self.queue.redis.set(cancel_key(self.job_id), "1", ex=self.queue.settings.result_ttl_s)
        self.queue.celery.control.revoke(self.job_id)
