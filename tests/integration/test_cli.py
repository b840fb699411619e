"""The real ``sdqueue`` command line, run as subprocesses against Redis, moto S3 and the worker."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest

from devstack.services import WorkerProcess, free_port, stack_env
from sdqueue.client import SdQueue
from sdqueue.names import BULK_QUEUE, INTERACTIVE_QUEUE, NOTIFY_QUEUE
from tests.helpers import sdqueue

COMMANDS = ("submit", "status", "wait", "cancel", "bulk", "worker", "schema", "build-tiny-model")
SMALL = ["--width", "64", "--height", "64", "--steps", "2"]


def test_help_reads_well(env: dict[str, str]) -> None:
    top = sdqueue(env, "--help")
    assert top.returncode == 0
    assert all(command in top.stdout for command in COMMANDS)
    assert "examples:" in top.stdout and "exit codes:" in top.stdout
    for command in COMMANDS:
        page = sdqueue(env, command, "--help")
        assert page.returncode == 0, command
        assert page.stdout.startswith(f"usage: sdqueue {command}"), command
        description = page.stdout.split("\n\n")[1]
        assert len(description) > 40, (command, description)
    assert "--max-in-flight" in sdqueue(env, "bulk", "--help").stdout


@pytest.mark.usefixtures("worker")
def test_submit_wait_prints_urls_that_serve_pngs(env: dict[str, str]) -> None:
    run = sdqueue(env, "submit", "txt2img", "a cli fox", *SMALL, "--seed", "5", "--num-images", "2", "--wait")
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["state"] == "succeeded" and [image["seed"] for image in body["images"]] == [5, 6]
    for image in body["images"]:
        with urllib.request.urlopen(image["http_url"], timeout=10) as response:
            assert response.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("worker")
def test_submit_then_status_then_wait(env: dict[str, str]) -> None:
    job_id = f"cli-{uuid.uuid4().hex[:8]}"
    submitted = sdqueue(
        env, "submit", "txt2img", "status check", *SMALL, "--job-id", job_id, "--lane", "bulk"
    )
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["job_id"] == job_id
    waited = sdqueue(env, "wait", job_id, "--timeout", "120")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["images"] == [f"s3://sdqueue/outputs/{job_id}/0.png"]
    status = json.loads(sdqueue(env, "status", job_id).stdout)
    assert status["state"] == "succeeded" and status["progress"]["step"] == status["progress"]["total"] == 2
    again = sdqueue(env, "submit", "txt2img", "status check", *SMALL, "--job-id", job_id)
    assert json.loads(again.stdout)["state"] == "succeeded", "the same job id runs once"


@pytest.mark.usefixtures("worker")
def test_cancel_a_running_job(env: dict[str, str], queue: SdQueue) -> None:
    job_id = f"cli-cancel-{uuid.uuid4().hex[:8]}"
    sdqueue(
        env,
        "submit",
        "txt2img",
        "long",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "150",
        "--job-id",
        job_id,
    )
    deadline = time.monotonic() + 60
    while not queue.handle(job_id).progress() and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = sdqueue(env, "cancel", job_id)
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["cancel"] == "requested"
    waited = sdqueue(env, "wait", job_id, "--timeout", "60")
    assert waited.returncode == 1
    assert json.loads(waited.stdout)["state"] == "cancelled"
    assert json.loads(sdqueue(env, "status", job_id).stdout)["state"] == "cancelled"


def test_invalid_job_exits_2_naming_the_field(env: dict[str, str]) -> None:
    run = sdqueue(env, "submit", "txt2img", "x", "--width", "100")
    assert run.returncode == 2
    assert "width" in run.stderr and "multiple of 8" in run.stderr
    refused = sdqueue(env, "submit", "txt2img", "x", "--webhook-url", "http://evil.example/hook")
    assert refused.returncode == 2 and "not allowed for webhooks" in refused.stderr


def test_unreachable_redis_exits_3(env: dict[str, str]) -> None:
    dead = stack_env(
        f"redis://127.0.0.1:{free_port()}/0",
        env["SDQ_S3_ENDPOINT_URL"],
        env["SDQ_MODEL"],
        redis_connect_timeout_s=0.5,
    )
    began = time.monotonic()
    run = sdqueue(dead, "submit", "txt2img", "x", *SMALL, timeout=60)
    print(f"submit to a closed port failed in {time.monotonic() - began:.1f}s")
    assert run.returncode == 3 and "unreachable" in run.stderr


def test_schema_and_tiny_model_commands(env: dict[str, str], tiny_model: str) -> None:
    schema = json.loads(sdqueue(env, "schema").stdout)
    assert {"Txt2ImgJob", "Img2ImgJob"} <= set(schema["$defs"])
    assert "webhook_url" in schema["$defs"]["Txt2ImgJob"]["properties"]
    built = sdqueue(env, "build-tiny-model", tiny_model)
    assert built.returncode == 0 and built.stdout.strip() == tiny_model


def test_worker_command_consumes_interactive_then_bulk_never_notify(
    queue: SdQueue, worker: WorkerProcess
) -> None:
    """The conftest worker runs through `sdqueue worker`; ask it which queues it consumes."""
    answer = queue.celery.control.inspect(destination=[worker.hostname], timeout=5).active_queues() or {}
    names = [q["name"] for q in answer[worker.hostname]]
    assert names == [INTERACTIVE_QUEUE, BULK_QUEUE] and NOTIFY_QUEUE not in names
