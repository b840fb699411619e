"""Bulk generation: stream a job file, submit under a cap, follow, resume by content, report.

The input is streamed: a run holds the lines in flight (at most ``max_in_flight``) and a batch
being read, never the whole file, plus a compact table of the job ids seen (``bulk_ids``) to report
repeated lines. Each line's job id is its own ``job_id``, else a hash of its normalised spec and
the run name, so running an edited file again finds the unchanged jobs done (their results in the
result backend) and submits only new or changed lines; jobs a previous run left in flight are
followed, not resubmitted (their submit-side claim says so).

Submitting is one Redis round trip per batch (``bulk_wire``): a script takes each job's claim and
pushes its message while the lane's list is shorter than ``max_in_flight``, so several runs side by
side keep the lane's depth under the cap. Bad lines are reported with their line numbers and the
good ones go on.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from sdqueue.bulk_ids import SeenIds, content_job_id, fingerprint_tag
from sdqueue.bulk_input import Row
from sdqueue.bulk_json import close_kwargs, spec_texts, spec_values
from sdqueue.bulk_report import ReportWriter
from sdqueue.bulk_uploads import InputUploader, is_local
from sdqueue.bulk_wire import LanePusher, Pushed, WireJob
from sdqueue.celeryconfig import make_celery
from sdqueue.client import SdQueue, job_record, publish_job, record_ttl_s
from sdqueue.contract import AnyJob, Img2ImgJob, parse_job_json, text_fingerprint
from sdqueue.errors import BrokerUnavailable, SdqError
from sdqueue.locations import ObjectRef
from sdqueue.names import cancel_key, job_claim_key, lane_queue
from sdqueue.settings import Settings
from sdqueue.states import FINAL, JobState, state_of

Job = AnyJob
FINAL_STATES = tuple(state.value for state in FINAL)
CHUNK = 500
Duplicates = Literal["once", "each"]


@dataclass
class BulkJob:
    """One line of the input to run, and what became of it."""

    line: int
    job_id: str
    spec: Job
    """The validated spec; its job_id is the line's own or None (the job id is ``job_id``)."""
    fingerprint: str
    """spec_fingerprint(spec), kept for the idempotency claim."""
    kwargs_open: str | None = None
    """The task kwargs as JSON, left open for the job id (``bulk_json.spec_texts``), when the
    preparer made them already (with the fingerprint's text, from the same pass)."""
    state: str = "pending"
    """pending, queued (submitted, unfinished), succeeded, failed, cancelled; at the end also
    unfinished (still queued or running when the run stopped)."""
    images: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    error: str | None = None
    resumed: bool = False
    duplicate_of: int | None = None

    def record(self) -> dict[str, Any]:
        """Its entry in the report."""
        body: dict[str, Any] = {"line": self.line, "job_id": self.job_id, "state": self.state}
        body["prompt"] = self.spec.prompt
        if self.images:
            body["images"], body["seeds"] = self.images, self.seeds
        if self.error:
            body["error"] = self.error
        if self.resumed:
            body["resumed"] = True
        if self.duplicate_of:
            body["duplicate_of"] = self.duplicate_of
        return body

    def kwargs_json(self) -> str:
        """The task kwargs as JSON, as ``publish_job`` sends them (the job id included)."""
        if self.kwargs_open is not None:
            return close_kwargs(self.kwargs_open, self.job_id, self.spec.job_id is not None)
        kwargs = self.spec.model_dump(mode="json", exclude_none=True)
        kwargs["job_id"] = self.job_id
        return json.dumps(kwargs)

    def claim(self) -> str:
        """The value of its submit-side claim (the job's record), as ``SdQueue.submit`` writes it."""
        return job_record(self.spec, self.fingerprint)

    def wire(self, settings: Settings) -> WireJob:
        ttl = record_ttl_s(self.spec, settings)
        return WireJob(self.job_id, self.spec.mode, self.kwargs_json(), self.claim(), ttl)


@dataclass
class LineNote:
    """A line that runs nothing: invalid, a duplicate of an earlier line, or not submitted."""

    line: int
    state: str
    error: str | None = None
    job_id: str | None = None
    duplicate_of: int | None = None

    def record(self) -> dict[str, Any]:
        body: dict[str, Any] = {"line": self.line, "state": self.state}
        for name in ("job_id", "error", "duplicate_of"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return body


Item = BulkJob | LineNote


class Preparer:
    """Turns rows into jobs: validates as a submit would, uploads local inputs, gives stable ids,
    spots repeated lines."""

    def __init__(
        self,
        queue: SdQueue,
        run_name: str = "",
        duplicates: Duplicates = "once",
        uploader: InputUploader | None = None,
    ) -> None:
        self.queue = queue
        self.run_name = run_name
        self.duplicates = duplicates
        self.uploader = uploader
        self.seen = SeenIds()

    def __call__(self, rows: Iterable[Row]) -> Iterator[Item]:
        for row in rows:
            yield self.one(row)

    def one(self, row: Row) -> Item:
        """The job of one row, or a note saying why it runs nothing."""
        try:
            spec = self._validate(row)
        except SdqError as exc:
            return LineNote(row.line, "invalid", f"line {row.line}: {exc}")
        fingerprint_text, kwargs_open = spec_texts(*spec_values(spec))
        fingerprint = text_fingerprint(fingerprint_text)
        job_id = spec.job_id or content_job_id(fingerprint, self.run_name)
        seen = self.seen.add(job_id, row.line, fingerprint)
        duplicate_of = None
        if seen is not None:
            if spec.job_id and seen.tag != fingerprint_tag(fingerprint):
                error = f"line {row.line}: job_id {job_id!r} is already used on line {seen.first_line}"
                return LineNote(row.line, "invalid", error + " for a different job")
            if spec.job_id or self.duplicates == "once":
                return LineNote(row.line, "duplicate", job_id=job_id, duplicate_of=seen.first_line)
            duplicate_of, job_id = seen.first_line, content_job_id(fingerprint, self.run_name, seen.count + 1)
        return BulkJob(row.line, job_id, spec, fingerprint, kwargs_open, duplicate_of=duplicate_of)

    def _validate(self, row: Row) -> Job:
        if row.text is not None:
            spec = parse_job_json(row.text, row.default_mode)
            if spec is not None and not _names_local_input(spec):
                return self.queue.validate(spec)
        if row.spec is None:
            raise SdqError(row.error or "unreadable line")
        raw = row.spec
        path = _local_input(raw)
        if path is not None and self.uploader is not None:
            raw = {**raw, "image_url": self.uploader.url_for(path)}
        return self.queue.validate(raw)


def _names_local_input(spec: Job) -> bool:
    """An img2img job whose input is a local file (to upload before it is validated again)."""
    return isinstance(spec, Img2ImgJob) and spec.mode == "img2img" and is_local(spec.image_url)


def _local_input(raw: dict[str, Any]) -> str | None:
    """The local file an img2img line names as its input, if it names one."""
    value = raw.get("image_url")
    if raw.get("mode") == "img2img" and isinstance(value, str) and is_local(value):
        return value
    return None


@dataclass
class BulkSummary:
    """Counts and rates of one bulk run."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    unfinished: int = 0
    not_submitted: int = 0
    queued: int = 0
    invalid: int = 0
    duplicate: int = 0
    resumed: int = 0
    enqueued: int = 0
    images: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    enqueue_jobs_per_s: float = 0.0
    interrupted: bool = False

    @property
    def settled(self) -> int:
        """Lines whose outcome is known (queued counts with --no-wait, where it is final)."""
        return self.succeeded + self.failed + self.cancelled + self.invalid + self.duplicate + self.queued

    @property
    def exit_code(self) -> int:
        """130 interrupted, 2 some line invalid, 1 some job not succeeded (or not yet), else 0."""
        if self.interrupted:
            return 130
        if self.invalid:
            return 2
        unsettled = self.failed + self.cancelled + self.unfinished + self.not_submitted
        return 1 if unsettled else 0

    def count(self, state: str) -> None:
        if hasattr(self, state) and state not in ("total", "images"):
            setattr(self, state, getattr(self, state) + 1)

    def as_dict(self) -> dict[str, Any]:
        items = asdict(self).items()
        return {key: round(value, 3) if isinstance(value, float) else value for key, value in items}


READ_SCRIPT = """
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local meta = redis.call('GET', KEYS[i])
  local cancel = redis.call('GET', KEYS[n + i])
  if meta or cancel then
    out[#out + 1] = i
    out[#out + 1] = meta or ''
    out[#out + 1] = cancel or ''
  end
end
return out
"""
"""KEYS: the result-backend keys of n jobs, then their cancel keys. Returns (index, meta, cancel)
for each job that has either, flat: a batch of fresh jobs answers an empty list, not 2n nils."""


class StateReader:
    """Reads the outcome of many jobs at once from the result backend (one script call per batch)."""

    def __init__(self, queue: SdQueue) -> None:
        self.queue = queue
        self.backend = queue.celery.backend
        probe = self.backend.get_key_for_task("x")
        probe = probe.decode() if isinstance(probe, bytes) else str(probe)
        self.meta_prefix = probe.removesuffix("x")
        self.script = queue.redis.register_script(READ_SCRIPT)

    def _meta_key(self, job_id: str) -> str:
        return self.meta_prefix + job_id

    def update(self, jobs: list[BulkJob]) -> list[BulkJob]:
        """Settle the jobs whose outcome is known; returns those."""
        finished = []
        for start in range(0, len(jobs), 1000):
            part = jobs[start : start + 1000]
            keys = [self.meta_prefix + job.job_id for job in part] + [cancel_key(job.job_id) for job in part]
            try:
                found = self.script(keys=keys)
            except Exception as exc:
                raise BrokerUnavailable(f"cannot read results from Redis: {exc}") from None
            for index, meta, cancelled in zip(found[::3], found[1::3], found[2::3], strict=True):
                job = part[int(index) - 1]
                if settle(job, json.loads(meta) if meta else None, bool(cancelled)):
                    finished.append(job)
        return finished

    def conflicts(self, jobs: list[BulkJob]) -> list[BulkJob]:
        """Fail the lines whose own job_id an earlier submit used for a different spec (their
        result is another job's), before any result is read back for them."""
        explicit = [job for job in jobs if job.spec.job_id]
        if not explicit:
            return []
        claims = self.queue.redis.mget([job_claim_key(job.job_id) for job in explicit])
        failed = []
        for job, claim in zip(explicit, claims, strict=True):
            if claim_fingerprint(claim) not in (None, job.fingerprint):
                job.state, job.error = "failed", conflict_error(job.job_id)
                failed.append(job)
        return failed

    def forget(self, jobs: list[BulkJob]) -> None:
        """Drop the results and claims of jobs so they can run again (``--retry-failed``)."""
        keys = [key for job in jobs for key in (self._meta_key(job.job_id), job_claim_key(job.job_id))]
        if keys:
            self.queue.redis.delete(*keys)


def claim_fingerprint(claim: str | bytes | None) -> str | None:
    """The spec fingerprint an idempotency claim records, if any."""
    try:
        body = json.loads(claim) if claim else None
    except json.JSONDecodeError:
        return None
    fingerprint = body.get("fingerprint") if isinstance(body, dict) else None
    return str(fingerprint) if fingerprint is not None else None


def conflict_error(job_id: str) -> str:
    return f"JobIdConflict: job id {job_id!r} was used for a different job; give this line a new job_id"


def _joined(message: Any) -> str:
    """A stored exception's ``exc_message`` (a list of arguments, or one value) as one text."""
    parts = message if isinstance(message, (list, tuple)) else [message]
    return "; ".join(str(part) for part in parts)


def _error_text(result: Any) -> str:
    if isinstance(result, dict) and "exc_type" in result:
        return f"{result['exc_type']}: {_joined(result.get('exc_message'))}"
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
        images = (result or {}).get("images", [])
        job.images = [image["url"] for image in images]
        job.seeds = [image.get("seed") for image in images]
    elif status == "FAILURE":
        job.error = _error_text(result)
    else:
        job.error = _cancel_reason(result)
    return True


def _cancel_reason(result: Any) -> str:
    """The worker's reason of a REVOKED result ("cancelled while running"), else "cancelled"."""
    message = result.get("exc_message") if isinstance(result, dict) else None
    reason = _joined(message) if message else ""
    if not reason:
        return "cancelled"
    return reason if reason.startswith("cancelled") else f"cancelled ({reason})"


def by_model(jobs: list[BulkJob]) -> list[tuple[str | None, list[BulkJob]]]:
    """Consecutive runs of jobs naming the same model, in order: each run goes to its alias's queue."""
    runs: list[tuple[str | None, list[BulkJob]]] = []
    for job in jobs:
        if runs and runs[-1][0] == job.spec.model:
            runs[-1][1].append(job)
        else:
            runs.append((job.spec.model, [job]))
    return runs


class Submitter(Protocol):
    published: int
    publish_seconds: float

    def push(self, jobs: list[BulkJob], cap: int) -> list[Pushed]: ...


class ScriptSubmitter:
    """The fast path: template messages, claim and push in one script call per batch."""

    def __init__(self, queue: SdQueue, lane: str) -> None:
        self.redis = queue.redis
        self.lane = lane
        self.pushers: dict[str, LanePusher] = {}
        self.settings = queue.settings
        self.where = queue.settings.redis_url_masked
        self.published = 0
        self.publish_seconds = 0.0

    def pusher(self, model: str | None) -> LanePusher:
        """The pusher of the lane's queue for ``model`` (a model alias has its own queues)."""
        name = lane_queue(self.lane, model)
        if name not in self.pushers:
            self.pushers[name] = LanePusher(self.redis, name)
        return self.pushers[name]

    def push(self, jobs: list[BulkJob], cap: int) -> list[Pushed]:
        began = time.perf_counter()
        try:
            results: list[Pushed] = []
            for model, group in by_model(jobs):
                results += self.pusher(model).push([job.wire(self.settings) for job in group], cap)
        except Exception as exc:
            raise BrokerUnavailable(f"could not enqueue {len(jobs)} jobs at {self.where}: {exc}") from None
        self.published += sum(result.pushed for result in results)
        self.publish_seconds += time.perf_counter() - began
        return results


class CelerySubmitter:
    """The ``--sent-events`` path: Celery's own messages and task-sent events, claims pipelined.

    The lane depth is read before the batch, so side-by-side runs may overshoot the cap by a batch."""

    def __init__(self, queue: SdQueue, lane: str) -> None:
        self.queue = queue
        self.lane = lane
        self.app = make_celery(queue.settings, "sdqueue-bulk")
        options = self.app.conf.broker_transport_options
        self.app.conf.broker_transport_options = {**options, "retry_on_timeout": False}
        self.published = 0
        self.publish_seconds = 0.0

    def push(self, jobs: list[BulkJob], cap: int) -> list[Pushed]:
        began = time.perf_counter()
        if cap:
            depth = {
                model: LanePusher(self.queue.redis, lane_queue(self.lane, model)).depth()
                for model, _ in by_model(jobs)
            }
            room = {model: max(0, cap - taken) for model, taken in depth.items()}
            kept = []
            for job in jobs:
                if room[job.spec.model] <= 0:
                    break
                room[job.spec.model] -= 1
                kept.append(job)
            jobs = kept
        pipe = self.queue.redis.pipeline(transaction=False)
        for job in jobs:
            wire = job.wire(self.queue.settings)
            pipe.set(job_claim_key(job.job_id), wire.claim, nx=True, ex=wire.claim_ttl_s)
            pipe.get(job_claim_key(job.job_id))
        replies = pipe.execute()
        results = [
            Pushed(True, False, None) if ok else Pushed(False, False, json.loads(value or "{}"))
            for ok, value in zip(replies[::2], replies[1::2], strict=True)
        ]
        self._publish([job for job, result in zip(jobs, results, strict=True) if result.pushed])
        self.published += sum(result.pushed for result in results)
        self.publish_seconds += time.perf_counter() - began
        return results + [Pushed(False, True, None)] * (len(jobs) - len(results))

    def _publish(self, jobs: list[BulkJob]) -> None:
        if not jobs:
            return
        try:
            with self.app.producer_or_acquire() as producer, producer.batch(max_size=2 * len(jobs) + 2):
                for job in jobs:
                    spec = job.spec.model_copy(update={"job_id": job.job_id})
                    publish_job(
                        self.app,
                        producer,
                        job.job_id,
                        spec,
                        lane_queue(self.lane, spec.model),
                        True,
                        retry=False,
                    )
        except Exception as exc:
            self.queue.redis.delete(*[job_claim_key(job.job_id) for job in jobs])
            raise BrokerUnavailable(f"could not enqueue {len(jobs)} jobs: {exc}") from None


class Progress(Protocol):
    def update(self, summary: BulkSummary, in_flight: int) -> None: ...

    def error(self, text: str) -> None: ...

    def done(self, summary: BulkSummary) -> None: ...


@dataclass
class BulkOptions:
    """How a bulk run behaves."""

    lane: str = "bulk"
    max_in_flight: int = 100
    """Most jobs of this run submitted and unfinished, and most messages waiting on the lane
    (from every producer) before this run adds more."""
    timeout_s: float | None = None
    poll_s: float = 0.2
    retry_failed: bool = False
    follow: bool = True
    """False: enqueue everything and return (the jobs go on; run again to collect results)."""
    sent_events: bool = False
    """Publish Celery's task-sent event per job (Celery's slower publish path). Off by default:
    a run that queues 100,000 jobs would fill Flower's in-memory task list (max_tasks) with queued
    entries. A bulk job still appears in Flower once the worker receives it."""


class BulkRun:
    """Drives one bulk run over a stream of rows: resume, submit under the cap, follow, report."""

    def __init__(
        self,
        queue: SdQueue,
        rows: Iterable[Row],
        preparer: Preparer,
        options: BulkOptions,
        report: ReportWriter | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.queue = queue
        self.rows = iter(rows)
        self.preparer = preparer
        self.options = options
        self.report = report
        self.progress = progress
        self.reader = StateReader(queue)
        self.submitter: Submitter = (
            CelerySubmitter(queue, options.lane)
            if options.sent_events
            else ScriptSubmitter(queue, options.lane)
        )
        self.ready: deque[BulkJob] = deque()
        self.inflight: dict[str, BulkJob] = {}
        self.summary = BulkSummary()
        self.stream_done = False
        self.started = time.monotonic()

    def run(self) -> BulkSummary:
        """Submit and follow every line; returns the summary (Ctrl-C stops it cleanly)."""
        try:
            stopped = self._loop()
            if stopped:
                self._close_out(drain=True)
        except KeyboardInterrupt:
            self.summary.interrupted = True
            self._close_out(drain=False)
        finally:
            if self.report:
                self.report.flush()
        summary = self._finish()
        if self.progress:
            self.progress.done(summary)
        return summary

    def _loop(self) -> bool:
        """Returns True when stopped by the timeout before every line settled."""
        deadline = self.started + self.options.timeout_s if self.options.timeout_s else None
        last_poll = 0.0
        while not (self.stream_done and not self.ready and not self.inflight):
            if deadline and time.monotonic() > deadline:
                return True
            read = self._fill()
            pushed = self._submit()
            finished: list[BulkJob] = []
            if self.inflight and time.monotonic() - last_poll >= self.options.poll_s:
                last_poll = time.monotonic()
                finished = self.reader.update(list(self.inflight.values()))
                for job in finished:
                    del self.inflight[job.job_id]
                    self._record(job)
            if self.report:
                self.report.flush()
            if self.progress:
                self.progress.update(self._snapshot(), len(self.inflight))
            if not (read or pushed or finished):
                time.sleep(self.options.poll_s)
        return False

    def _fill(self) -> int:
        """Read lines until a batch of jobs is ready; settle those an earlier run finished."""
        if self.stream_done or len(self.ready) >= CHUNK:
            return 0
        fresh: list[BulkJob] = []
        read = 0
        while len(self.ready) + len(fresh) < CHUNK and read < 4 * CHUNK:
            row = next(self.rows, None)
            if row is None:
                self.stream_done = True
                break
            read += 1
            self.summary.total += 1
            item = self.preparer.one(row)
            if isinstance(item, LineNote):
                self._record(item)
            else:
                fresh.append(item)
        self._resume(fresh)
        self.ready.extend(job for job in fresh if job.state == "pending")
        return read or int(self.stream_done)

    def _resume(self, jobs: list[BulkJob]) -> None:
        for job in self.reader.conflicts(jobs):
            self._record(job)
        done = self.reader.update([job for job in jobs if job.state == "pending"])
        if self.options.retry_failed:
            failed = [job for job in done if job.state == "failed"]
            self.reader.forget(failed)
            for job in failed:
                job.state, job.error = "pending", None
        for job in done:
            if job.state != "pending":
                job.resumed = True
                self._record(job)

    def _room(self) -> int:
        if not self.options.follow:
            return CHUNK
        return min(self.options.max_in_flight - len(self.inflight), CHUNK)

    def _submit(self) -> int:
        room = self._room()
        if room <= 0 or not self.ready:
            return 0
        batch = [self.ready.popleft() for _ in range(min(room, len(self.ready)))]
        results = self.submitter.push(batch, self.options.max_in_flight)
        deferred = [job for job, result in zip(batch, results, strict=True) if result.deferred]
        self.ready.extendleft(reversed(deferred))
        for job, result in zip(batch, results, strict=True):
            if result.deferred:
                continue
            fingerprint = (result.claim or {}).get("fingerprint")
            if fingerprint not in (None, job.fingerprint):
                job.state, job.error = "failed", conflict_error(job.job_id)
                self._record(job)
            elif self.options.follow:
                job.state = "queued"
                self.inflight[job.job_id] = job
            else:
                job.state = "queued"
                self._record(job)
        return len(batch) - len(deferred)

    def _record(self, item: Item) -> None:
        self.summary.count(item.state)
        if isinstance(item, BulkJob):
            self.summary.resumed += item.resumed
            if item.state == "succeeded" and not item.resumed:
                self.summary.images += len(item.images)
            if item.state in ("failed", "cancelled") and item.error and self.progress:
                self.progress.error(f"line {item.line}: {item.error}")
        elif item.state == "invalid" and item.error and self.progress:
            self.progress.error(item.error)
        if self.report:
            self.report.write(item.record())

    def _close_out(self, drain: bool) -> None:
        """Report what is still in flight as unfinished; with ``drain``, the unread lines as not submitted."""
        for job in [*self.inflight.values(), *self.ready]:
            job.state = "unfinished" if job.job_id in self.inflight else "not_submitted"
            self._record(job)
        self.inflight.clear()
        self.ready.clear()
        if drain and not self.stream_done:
            for row in self.rows:
                self.summary.total += 1
                self._record(LineNote(row.line, "not_submitted"))
            self.stream_done = True

    def _snapshot(self) -> BulkSummary:
        summary = BulkSummary(**{**asdict(self.summary)})
        summary.enqueued = self.submitter.published
        summary.elapsed_s = time.monotonic() - self.started
        summary.images_per_s = summary.images / summary.elapsed_s if summary.elapsed_s else 0.0
        seconds = self.submitter.publish_seconds
        summary.enqueue_jobs_per_s = summary.enqueued / seconds if seconds else 0.0
        return summary

    def _finish(self) -> BulkSummary:
        self.summary = self._snapshot()
        return self.summary


def presigner(queue: SdQueue) -> Callable[[str], str]:
    """Turns ``s3://bucket/key`` into a presigned GET URL."""

    def presign(url: str) -> str:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        signed: str = queue.storage.presign(ObjectRef(bucket, key))
        return signed

    return presign
