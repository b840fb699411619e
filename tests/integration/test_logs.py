"""Worker logs with SDQ_LOG_FORMAT=json: one JSON object a line, the job's fields on each record of
a job, and expected refusals logged at INFO ("raised expected"), never as an unexpected error."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.services import MotoServer
from sdqueue import Img2ImgJob, JobFailed, Txt2ImgJob
from tests.helpers import Stack, own_stack

SMALL = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def stack(logdir: Path, moto: MotoServer, s3: Any, tiny_model: str) -> Iterator[Stack]:
    with own_stack(logdir, moto.url, tiny_model, "jsonlogs", log_format="json") as running:
        yield running


def records(stack: Stack) -> list[dict[str, Any]]:
    assert stack.worker is not None
    lines = stack.worker.log_path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def job_records(stack: Stack, job_id: str, want: str, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [r for r in records(stack) if r.get("job_id") == job_id]
        if any(want in r["message"] for r in mine):
            return mine
        time.sleep(0.1)
    raise AssertionError(f"no record {want!r} for {job_id}")


def test_every_record_of_a_job_names_it_and_refusals_are_not_errors(stack: Stack, tiny_model: str) -> None:
    ok = stack.queue.submit(Txt2ImgJob(prompt="logged", **SMALL), lane="bulk")
    ok.wait(timeout=120)
    mine = job_records(stack, ok.job_id, "succeeded")
    print(json.dumps(mine[-1]))
    assert all(r["lane"] == "bulk" and r["mode"] == "txt2img" and r["model"] == tiny_model for r in mine)
    assert {"time", "level", "logger", "message", "thread"} <= set(mine[-1])

    refused = stack.queue.submit(
        Img2ImgJob(
            prompt="x", image_url="s3://inputs/logs/none.png", width=64, height=64, steps=4, strength=0.5
        )
    )
    with pytest.raises(JobFailed):
        refused.wait(timeout=120)
    mine = job_records(stack, refused.job_id, "raised expected")
    print(json.dumps(mine[-1]))
    assert [r["level"] for r in mine if "raised" in r["message"]] == ["INFO"]
    assert all(r["mode"] == "img2img" and r["lane"] == "interactive" for r in mine)
    assert not [r for r in records(stack) if r["level"] == "ERROR" and refused.job_id in r["message"]]


def test_start_up_phases_are_logged_and_in_the_heartbeat(stack: Stack) -> None:
    """Where a start's time went, once the worker is ready: one log line and the heartbeat key."""
    from sdqueue.names import worker_alive_key

    assert stack.worker is not None
    line = next(r for r in records(stack) if r["message"].startswith("start-up ready"))
    print(line["message"])
    wait = time.monotonic() + 15
    while not (body := stack.queue.redis.get(worker_alive_key(stack.worker.hostname))):
        assert time.monotonic() < wait, "no heartbeat"
        time.sleep(0.2)
    phases = json.loads(body)["startup"]
    assert list(phases)[:3] == ["process_s", "checks_s", "load_s"] and list(phases)[-1] == "ready_s"
    assert "warmup_batch_1_s" in phases and phases["warmup_s"] >= phases["warmup_batch_1_s"] > 0
    inner = sum(phases[k] for k in ("checks_s", "load_s", "optimise_s", "warmup_s"))
    assert phases["process_s"] > 0 and inner <= phases["ready_s"] - phases["process_s"] + 0.05
    assert f"load {phases['load_s']:.1f}" in line["message"]
