"""State truth: the manifest in S3 answers for a finished job once its result entry is gone (the
result TTL, simulated by deleting the key), an id never submitted reads unknown, waits time out
as WaitTimeout, and the CLI says all of it without a traceback, with its documented exit codes."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from devstack.services import MotoServer, WorkerProcess
from sdqueue.client import SdQueue
from sdqueue.errors import JobNotFound, WaitTimeout
from sdqueue.names import job_claim_key
from sdqueue.states import JobState
from tests.helpers import TINY_MODEL, manifest_of, own_stack, sdqueue

SPEC: dict[str, Any] = {"mode": "txt2img", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


def forget_result(queue: SdQueue, job_id: str, record_too: bool = True) -> None:
    """What the result TTL does: the result-backend entry (and the submit record) expire."""
    queue.redis.delete(queue.celery.backend.get_key_for_task(job_id).decode())
    if record_too:
        queue.redis.delete(job_claim_key(job_id))


def cli_json(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    done = sdqueue(env, *args)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout), done.stderr


@pytest.fixture
def job_id() -> str:
    return f"truth-{uuid.uuid4().hex[:12]}"


def test_finished_job_is_read_from_its_manifest_after_the_result_ttl(
    worker: WorkerProcess, queue: SdQueue, env: dict[str, str], s3: Any, job_id: str
) -> None:
    first = queue.submit({**SPEC, "job_id": job_id}).wait(timeout=120)
    forget_result(queue, job_id)
    handle = queue.handle(job_id)
    assert handle.state() is JobState.SUCCEEDED
    again = handle.result()
    assert again is not None and again.images == first.images and again.manifest_url == first.manifest_url
    assert handle.wait(timeout=5).timings == first.timings
    code, body, _ = cli_json(env, "status", job_id)
    assert code == 0 and body["state"] == "succeeded" and body["images"] == [i.url for i in first.images]
    code, body, _ = cli_json(env, "wait", job_id, "--timeout", "5")
    assert code == 0 and body["state"] == "succeeded"


def test_resubmit_after_the_result_ttl_does_not_regenerate(
    worker: WorkerProcess, queue: SdQueue, s3: Any, job_id: str
) -> None:
    first = queue.submit({**SPEC, "job_id": job_id}).wait(timeout=120)
    created = manifest_of(s3, first)["created_at"]
    forget_result(queue, job_id)
    again = queue.submit({**SPEC, "job_id": job_id}).wait(timeout=120)
    assert again.timings == first.timings, "a regenerated job would carry new timings"
    assert manifest_of(s3, again)["created_at"] == created


def test_job_with_its_own_output_location_is_found_through_its_record(
    worker: WorkerProcess, queue: SdQueue, job_id: str
) -> None:
    spec = {**SPEC, "job_id": job_id, "output": {"bucket": "sdqueue", "prefix": "elsewhere"}}
    first = queue.submit(spec).wait(timeout=120)
    assert "/elsewhere/" in first.manifest_url
    forget_result(queue, job_id, record_too=False)
    record = json.loads(queue.redis.get(job_claim_key(job_id)))
    assert record["output"] == {"bucket": "sdqueue", "prefix": "elsewhere"}
    assert queue.redis.ttl(job_claim_key(job_id)) > queue.settings.result_ttl_s
    record["at"] = time.time() - queue.settings.result_ttl_s - 1  # the result could have expired
    queue.redis.set(job_claim_key(job_id), json.dumps(record))
    handle = queue.handle(job_id)
    assert handle.state() is JobState.SUCCEEDED
    assert handle.wait(timeout=5).manifest_url == first.manifest_url


def test_unknown_ids_and_waits_that_time_out(logdir: Path, moto: MotoServer, s3: Any) -> None:
    with own_stack(logdir, moto.url, str(TINY_MODEL), "truth", with_worker=False) as stack:
        queue = stack.queue
        never = queue.handle(f"never-{uuid.uuid4().hex[:8]}")
        assert never.state() is JobState.UNKNOWN
        with pytest.raises(JobNotFound):
            never.wait(timeout=1)
        queued = queue.submit(SPEC)  # an auto id leaves a record too: queued, not unknown
        assert queued.state() is JobState.QUEUED
        began = time.monotonic()
        with pytest.raises(WaitTimeout) as caught:
            queued.wait(timeout=0.5)
        assert isinstance(caught.value, TimeoutError) and time.monotonic() - began < 30
        code, body, _ = cli_json(stack.env, "status", never.job_id)
        assert (code, body["state"]) == (4, "unknown")
        code, body, _ = cli_json(stack.env, "wait", never.job_id, "--timeout", "1")
        assert (code, body["state"]) == (4, "unknown")
        code, body, _ = cli_json(stack.env, "status", queued.job_id)
        assert (code, body["state"]) == (0, "queued")
        code, body, _ = cli_json(stack.env, "wait", queued.job_id, "--timeout", "0.5")
        assert (code, body["state"]) == (1, "queued") and "not finished" in body["error"]
        queued.cancel()
        code, body, _ = cli_json(stack.env, "status", queued.job_id)
        assert (code, body["state"]) == (1, "cancelled")
