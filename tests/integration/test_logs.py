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
