"""Bulk generation: submit many jobs with a cap on jobs in flight, follow them, resume, report.

Each line gets a deterministic job id (its own ``job_id``, else a hash of its line number and
spec), so running the same file again finds the jobs already done (their results in the result
backend) and submits only the rest; jobs a previous run left in flight are followed, not
resubmitted (the submit-side claim on the job id says so). At most ``max_in_flight`` jobs are
submitted and unfinished at any time: the queue never holds more than that for this run.

Enqueueing is batched: the idempotency claims of a batch go to Redis in one pipeline, and the
Celery messages in another, through one producer connection (kombu's ``Producer.batch``), with
no per-task result subscription. The interactive ``SdQueue.submit`` does one job per round trip.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from celery import Celery

from sdqueue.bulk_input import Row
from sdqueue.celeryconfig import make_celery
from sdqueue.client import SdQueue, job_record, publish_job, record_ttl_s
from sdqueue.contract import Img2ImgJob, Txt2ImgJob, spec_fingerprint
from sdqueue.errors import BrokerUnavailable, SdqError
from sdqueue.locations import ObjectRef
from sdqueue.names import cancel_key, job_claim_key, lane_queue
from sdqueue.states import FINAL, JobState, state_of

Job = Txt2ImgJob | Img2ImgJob
FINAL_STATES = tuple(state.value for state in FINAL)
CHUNK = 500


@dataclass
class BulkJob:
    """One line of the input and what became of it."""

    line: int
    job_id: str
    spec: Job
    fingerprint: str
    """spec_fingerprint(spec), kept for the idempotency claim."""
    state: str = "pending"
    """pending, queued (submitted, unfinished), succeeded, failed, cancelled; at the end also
    unfinished (still queued or running when the run stopped) or not_submitted."""
    images: list[str] = field(default_factory=list)
    error: str | None = None
    resumed: bool = False

    def report_line(self) -> dict[str, Any]:
        body: dict[str, Any] = {"line": self.line, "job_id": self.job_id, "state": self.state}
        if self.images:
            body["images"] = self.images
        if self.error:
            body["error"] = self.error
        if self.resumed:
            body["resumed"] = True
        return body


@dataclass
class BulkSummary:
    """Counts and rates of one bulk run."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    unfinished: int = 0
    not_submitted: int = 0
    resumed: int = 0
    enqueued: int = 0
    images: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    enqueue_jobs_per_s: float = 0.0
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """0 when every job succeeded, 130 when interrupted, 1 otherwise."""
        if self.interrupted:
            return 130
        return 0 if self.succeeded == self.total else 1

    def as_dict(self) -> dict[str, Any]:
        items = asdict(self).items()
        return {key: round(value, 3) if isinstance(value, float) else value for key, value in items}


def bulk_job_id(line: int, fingerprint: str) -> str:
    """Deterministic id of a line without its own job_id: same line number and spec, same id."""
    return "bulk-" + hashlib.sha256(f"{line}:{fingerprint}".encode()).hexdigest()[:32]


def prepare(queue: SdQueue, rows: Iterable[Row]) -> tuple[list[BulkJob], list[str]]:
    """Validate every row as a submit would; returns the jobs and line-numbered errors."""
    jobs: list[BulkJob] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for row in rows:
        try:
            if row.spec is None:
                raise SdqError(row.error or "unreadable line")
            spec = queue.validate(row.spec)
        except SdqError as exc:
            errors.append(f"line {row.line}: {exc}")
            continue
        fingerprint = spec_fingerprint(spec)
        job_id = spec.job_id or bulk_job_id(row.line, fingerprint)
        if job_id in seen:
            errors.append(f"line {row.line}: job_id {job_id!r} is already used on line {seen[job_id]}")
            continue
        seen[job_id] = row.line
        jobs.append(BulkJob(row.line, job_id, spec.model_copy(update={"job_id": job_id}), fingerprint))
    return jobs, errors


def bulk_celery(queue: SdQueue) -> Celery:
    """A producer app like the client's, with pipelined publishing allowed.

    kombu batches publishes only when a Redis command is never retried on timeout (a replayed
    pipeline could enqueue twice); a failed batch is reported, its claims released, and a rerun
    resubmits it (duplicates are harmless: job ids are idempotent in the worker).
    """
    app = make_celery(queue.settings, "sdqueue-bulk")
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "retry_on_timeout": False}
    return app


class Enqueuer:
    """Claims job ids and publishes their messages, a batch per Redis round trip."""

    def __init__(self, queue: SdQueue, lane: str, sent_events: bool = False) -> None:
        self.queue = queue
        self.lane = lane
        self.app = bulk_celery(queue)
        self.sent_events = sent_events and bool(self.app.conf.task_send_sent_event)
        self.published = 0
        self.publish_seconds = 0.0

    def submit(self, jobs: list[BulkJob]) -> None:
        """Submit a batch; jobs already claimed by an earlier run are followed, not resent."""
        began = time.perf_counter()
        claimed = self._claim(jobs)
        fresh = [job for job, ok in zip(jobs, claimed, strict=False) if ok]
        self._check_conflicts([job for job, ok in zip(jobs, claimed, strict=False) if not ok])
        if fresh:
            self._publish(fresh)
        for job in jobs:
            if job.state == "pending":
                job.state = "queued"
        self.published += len(fresh)
        self.publish_seconds += time.perf_counter() - began

    def _claim(self, jobs: list[BulkJob]) -> list[bool]:
        pipe = self.queue.redis.pipeline(transaction=False)
        for job in jobs:
            claim = job_record(job.spec, job.fingerprint)
            pipe.set(
                job_claim_key(job.job_id), claim, nx=True, ex=record_ttl_s(job.spec, self.queue.settings)
            )
        try:
            return [bool(ok) for ok in pipe.execute()]
        except Exception as exc:
            where = self.queue.settings.redis_url_masked
            raise BrokerUnavailable(f"cannot reach Redis at {where}: {exc}") from None

    def _check_conflicts(self, jobs: list[BulkJob]) -> None:
        if not jobs:
            return
        claims = self.queue.redis.mget([job_claim_key(job.job_id) for job in jobs])
        for job, claim in zip(jobs, claims, strict=False):
            fingerprint = json.loads(claim).get("fingerprint") if claim else None
            if fingerprint not in (None, job.fingerprint):
                job.state = "failed"
                job.error = f"JobIdConflict: job id {job.job_id!r} was used for a different job"

    def _publish(self, jobs: list[BulkJob]) -> None:
        try:
            with self.app.producer_or_acquire() as producer, producer.batch(max_size=2 * len(jobs) + 2):
                for job in jobs:
                    publish_job(
                        self.app,
                        producer,
                        job.job_id,
                        job.spec,
                        lane_queue(self.lane, job.spec.model),
                        self.sent_events,
                        retry=False,
                    )
        except Exception as exc:
            self.queue.redis.delete(*[job_claim_key(job.job_id) for job in jobs])
            error = f"{type(exc).__name__}: {exc}"
            raise BrokerUnavailable(f"could not enqueue {len(jobs)} jobs: {error}") from None

    @property
    def jobs_per_s(self) -> float:
        return self.published / self.publish_seconds if self.publish_seconds else 0.0


class StateReader:
    """Reads the outcome of many jobs at once from the result backend (two MGETs per batch)."""

    def __init__(self, queue: SdQueue) -> None:
        self.queue = queue
        self.backend = queue.celery.backend

    def _meta_key(self, job_id: str) -> str:
        key = self.backend.get_key_for_task(job_id)
        return key.decode() if isinstance(key, bytes) else str(key)

    def update(self, jobs: list[BulkJob]) -> list[BulkJob]:
        """Settle the jobs whose outcome is known; returns those."""
        finished = []
        for start in range(0, len(jobs), 1000):
            part = jobs[start : start + 1000]
            pipe = self.queue.redis.pipeline(transaction=False)
            pipe.mget([self._meta_key(job.job_id) for job in part])
            pipe.mget([cancel_key(job.job_id) for job in part])
            metas, cancels = pipe.execute()
            for job, meta, cancelled in zip(part, metas, cancels, strict=False):
                if settle(job, json.loads(meta) if meta else None, bool(cancelled)):
                    finished.append(job)
        return finished

    def forget(self, jobs: list[BulkJob]) -> None:
        """Drop the results and claims of jobs so they can run again (``--retry-failed``)."""
        keys = [key for job in jobs for key in (self._meta_key(job.job_id), job_claim_key(job.job_id))]
        if keys:
            self.queue.redis.delete(*keys)


def _error_text(result: Any) -> str:
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        parts = message if isinstance(message, (list, tuple)) else [message]
        text = "; ".join(str(part) for part in parts)
        return f"{result['exc_type']}: {text}"
    return str(result)


def settle(job: BulkJob, meta: dict[str, Any] | None, cancelled: bool) -> bool:
    """Set a job's final state from its result-backend entry; False while it is unfinished."""
    status = (meta or {}).get("status")
    result = (meta or {}).get("result")
    state = state_of(status, result, cancel_requested=cancelled)
    if not state.final:
        return False
    job.state = state.value
    if state is JobState.SUCCEEDED:
        job.images = [image["url"] for image in (result or {}).get("images", [])]
    else:
        job.error = _error_text(result) if status == "FAILURE" else "cancelled"
    return True


ProgressFn = Callable[[BulkSummary, int], None]


@dataclass
class BulkOptions:
    """How a bulk run behaves."""

    lane: str = "bulk"
    max_in_flight: int = 100
    timeout_s: float | None = None
    poll_s: float = 0.2
    retry_failed: bool = False
    sent_events: bool = False
    """Publish Celery's task-sent event per job. Off by default: those events cost about half of the
    enqueue time, and a run that queues 100,000 jobs would fill Flower's in-memory task list
    (max_tasks) with queued entries, evicting the history of interactive jobs. A bulk job still
    appears in Flower once the worker receives it, and ``sdqueue bulk`` shows its own progress."""


class BulkRun:
    """Drives one bulk run: resume, submit under the in-flight cap, follow, summarise."""

    def __init__(
        self, queue: SdQueue, jobs: list[BulkJob], options: BulkOptions, progress: ProgressFn | None = None
    ) -> None:
        self.queue = queue
        self.jobs = jobs
        self.options = options
        self.progress = progress
        self.reader = StateReader(queue)
        self.enqueuer = Enqueuer(queue, options.lane, options.sent_events)
        self.inflight: dict[str, BulkJob] = {}
        self.started = time.monotonic()

    def resume(self) -> None:
        """Mark the jobs a previous run finished; with retry_failed, forget the failed ones."""
        for job in self.reader.update(self.jobs):
            job.resumed = True
        if self.options.retry_failed:
            failed = [job for job in self.jobs if job.state == "failed"]
            self.reader.forget(failed)
            for job in failed:
                job.state, job.error, job.resumed = "pending", None, False

    def run(self) -> BulkSummary:
        """Submit and follow every pending job; returns the summary (Ctrl-C stops it cleanly)."""
        interrupted = False
        try:
            self.resume()
            self._loop()
        except KeyboardInterrupt:
            interrupted = True
        for job in self.jobs:
            if job.state == "queued":
                job.state = "unfinished"
            elif job.state == "pending":
                job.state = "not_submitted"
        summary = self.summary()
        summary.interrupted = interrupted
        return summary

    def _loop(self) -> None:
        todo = deque(job for job in self.jobs if job.state == "pending")
        deadline = self.started + self.options.timeout_s if self.options.timeout_s else None
        last_poll = 0.0
        while todo or self.inflight:
            if deadline and time.monotonic() > deadline:
                return
            room = min(self.options.max_in_flight - len(self.inflight), CHUNK, len(todo))
            batch = [todo.popleft() for _ in range(max(room, 0))]
            if batch:
                self.enqueuer.submit(batch)
                self.inflight.update({job.job_id: job for job in batch if job.state == "queued"})
            finished: list[BulkJob] = []
            if self.inflight and (room <= 0 or time.monotonic() - last_poll >= self.options.poll_s):
                last_poll = time.monotonic()
                finished = self.reader.update(list(self.inflight.values()))
                for job in finished:
                    del self.inflight[job.job_id]
            if self.progress:
                self.progress(self.summary(), len(self.inflight))
            if not batch and not finished:
                time.sleep(self.options.poll_s)

    def summary(self) -> BulkSummary:
        summary = BulkSummary(total=len(self.jobs), enqueued=self.enqueuer.published)
        for job in self.jobs:
            if job.state in FINAL_STATES or job.state in ("unfinished", "not_submitted"):
                setattr(summary, job.state, getattr(summary, job.state) + 1)
            summary.resumed += job.resumed
            if job.state == "succeeded" and not job.resumed:
                summary.images += len(job.images)
        summary.elapsed_s = time.monotonic() - self.started
        summary.images_per_s = summary.images / summary.elapsed_s if summary.elapsed_s else 0.0
        summary.enqueue_jobs_per_s = self.enqueuer.jobs_per_s
        return summary


def write_report(path: str, jobs: list[BulkJob], presign: Callable[[str], str] | None = None) -> None:
    """One JSON line per job, in input order: line, job_id, state, images (or error)."""
    with open(path, "w", encoding="utf-8") as out:
        for job in sorted(jobs, key=lambda item: item.line):
            body = job.report_line()
            if presign and job.images:
                body["http_urls"] = [presign(url) for url in job.images]
            out.write(json.dumps(body) + "\n")


def presigner(queue: SdQueue) -> Callable[[str], str]:
    """Turns ``s3://bucket/key`` into a presigned GET URL."""

    def presign(url: str) -> str:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        signed: str = queue.storage.presign(ObjectRef(bucket, key))
        return signed

    return presign
