"""Prometheus metrics scraped from a real worker, and Flower watching the same broker."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.services import ROOT, MotoServer, WorkerProcess, free_port, wait_for
from sdqueue import Img2ImgJob, JobFailed, Txt2ImgJob
from sdqueue.names import run_lease_key
from tests.helpers import Stack, own_stack, png_bytes, smooth_image, wait_cancelled_by_worker

SMALL = {"width": 64, "height": 64, "steps": 2}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def stack(logdir: Path, moto: MotoServer, s3: Any, tiny_model: str) -> Iterator[Stack]:
    with own_stack(
        logdir, moto.url, tiny_model, "metrics", metrics_port=free_port(), visibility_timeout_s=5
    ) as running:
        yield running


def scrape(stack: Stack) -> Samples:
    url = f"http://127.0.0.1:{stack.env['SDQ_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def run_mixed_jobs(stack: Stack, s3: Any) -> None:
    """2 txt2img + 1 img2img succeed (one after a retry), 1 img2img fails, 1 txt2img is cancelled."""
    queue = stack.queue
    s3.put_object(Bucket="inputs", Key="metrics/in.png", Body=png_bytes(smooth_image(5)))
    held = f"metrics-retry-{uuid.uuid4().hex[:6]}"
    queue.redis.set(run_lease_key(held), "another-worker", px=3000)  # as if running on another worker
    handles = [
        queue.submit(Txt2ImgJob(prompt="m1", num_images=2, **SMALL)),
        queue.submit(Txt2ImgJob(prompt="m2", job_id=held, **SMALL)),
        queue.submit(
            Img2ImgJob(
                prompt="m3",
                image_url="s3://inputs/metrics/in.png",
                width=64,
                height=64,
                steps=4,
                strength=0.5,
            )
        ),
    ]
    for handle in handles:
        handle.wait(timeout=120)
    with pytest.raises(JobFailed):
        queue.submit(
            Img2ImgJob(
                prompt="m4",
                image_url="s3://inputs/metrics/none.png",
                width=64,
                height=64,
                steps=4,
                strength=0.5,
            )
        ).wait(timeout=120)
    long = queue.submit(Txt2ImgJob(prompt="m5", width=64, height=64, steps=150))
    deadline = time.monotonic() + 60
    while not long.progress() and time.monotonic() < deadline:
        time.sleep(0.05)
    long.cancel()
    wait_cancelled_by_worker(queue, long.job_id)


def test_worker_metrics_move_with_the_jobs_it_runs(stack: Stack, s3: Any) -> None:
    before = scrape(stack)
    run_mixed_jobs(stack, s3)
    cancelled = ("sdqueue_jobs_total", frozenset({"mode": "txt2img", "outcome": "cancelled"}.items()))
    deadline = time.monotonic() + 30  # a cancel is counted on task_revoked, just after the backend write
    while (after := scrape(stack)).get(cancelled, 0) == before.get(cancelled, 0):
        assert time.monotonic() < deadline, "the cancelled job never reached the metrics"
        time.sleep(0.1)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    deliveries = {
        (mode, outcome): moved("sdqueue_job_deliveries_total", mode=mode, outcome=outcome)
        for mode in ("txt2img", "img2img")
        for outcome in ("succeeded", "failed", "cancelled", "retried")
    }
    print("sdqueue_job_deliveries_total moved:", {f"{m}/{o}": v for (m, o), v in deliveries.items() if v})
    assert deliveries == {
        ("txt2img", "succeeded"): 2,
        ("txt2img", "failed"): 0,
        ("txt2img", "cancelled"): 1,
        ("txt2img", "retried"): 1,
        ("img2img", "succeeded"): 1,
        ("img2img", "failed"): 1,
        ("img2img", "cancelled"): 0,
        ("img2img", "retried"): 0,
    }
    jobs = {key: moved("sdqueue_jobs_total", mode=key[0], outcome=key[1]) for key in deliveries}
    assert jobs == {**deliveries, ("txt2img", "retried"): 0}, "once per job: a retry is not a job"
    assert ("sdqueue_jobs_total", frozenset({("mode", "txt2img"), ("outcome", "retried")})) not in after
    waits = moved("sdqueue_queue_wait_seconds_count", lane="interactive", source="producer")
    assert waits == 5, "every job's first delivery records its queue wait (the retry does not)"
    phases = (("generate", 3), ("encode_upload", 3), ("total", 3), ("queue_wait", 3), ("input_fetch", 1))
    for phase, count in phases:
        assert moved("sdqueue_job_duration_seconds_count", phase=phase) == count, phase
    assert moved("sdqueue_job_duration_seconds_sum", phase="generate") > 0
    assert moved("sdqueue_batch_images_count") == 3 and moved("sdqueue_batch_images_sum") == 4
    assert moved("sdqueue_worker_busy_seconds_total") > 0 and moved("sdqueue_gpu_batches_total") >= 3
    assert value(after, "sdqueue_model_load_seconds") > 0
    assert ("sdqueue_gpu_max_memory_allocated_bytes", frozenset()) in after, "0 on CPU, but exported"


def test_a_busy_metrics_port_stops_the_worker_at_start(logdir: Path, stack: Stack) -> None:
    clash = WorkerProcess(logdir, stack.env, name="metrics-clash")
    with pytest.raises(RuntimeError, match="exited at start"):
        clash.start(timeout=120)
    assert "cannot serve metrics" in clash.tail(80)


@pytest.fixture(scope="module")
def flower(stack: Stack, logdir: Path) -> Iterator[str]:
    port = free_port()
    log = open(logdir / "flower.log", "ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            f"--broker={stack.redis.url}",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            "--basic-auth=u:p",
        ],
        cwd=ROOT,
        env=stack.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _status(f"{url}/healthcheck") == 200, 60, "flower")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def _status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"} if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _get_json(url: str) -> Any:
    import json

    request = urllib.request.Request(url, headers={"Authorization": "Basic " + b64encode(b"u:p").decode()})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_flower_sees_our_tasks_with_basic_auth(stack: Stack, flower: str) -> None:
    assert _status(f"{flower}/api/tasks") == 401, "the API needs the basic-auth user"
    assert stack.worker is not None
    hostname = stack.worker.hostname
    wait_for(lambda: hostname in _get_json(f"{flower}/api/workers?refresh=1"), 60, "flower seeing the worker")
    job_id = stack.queue.submit(Txt2ImgJob(prompt="seen by flower", **SMALL)).wait(timeout=120).job_id

    def task_seen() -> bool:
        info = _get_json(f"{flower}/api/tasks?limit=100").get(job_id, {})
        return info.get("name") == "sdqueue.txt2img" and info.get("state") == "SUCCESS"

    wait_for(task_seen, 30, "flower seeing the task")
    with urllib.request.urlopen(f"{flower}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    succeeded = [
        line
        for line in metrics.splitlines()
        if line.startswith("flower_events_total")
        and 'task="sdqueue.txt2img"' in line
        and 'type="task-succeeded"' in line
    ]
    print("flower:", succeeded)
    assert succeeded and float(succeeded[0].split()[-1]) >= 1


def test_metrics_move_while_a_long_job_runs(stack: Stack) -> None:
    """Busy time accrues during the job, the running and queue-depth gauges show it, a raw
    Celery client (no sdq_submitted_at header) gets its queue wait from the worker's clock."""
    queue = stack.queue
    long = queue.submit(Txt2ImgJob(prompt="long", width=256, height=256, steps=150))
    behind = queue.submit(Txt2ImgJob(prompt="behind", **SMALL), lane="bulk")
    try:
        deadline = time.monotonic() + 90
        while not long.progress() and time.monotonic() < deadline:
            time.sleep(0.05)
        first = scrape(stack)
        time.sleep(2.0)
        second = scrape(stack)
        assert long.state() == "running", "the job must still run between the two scrapes"
    finally:
        long.cancel()
    busy = value(second, "sdqueue_worker_busy_seconds_total") - value(
        first, "sdqueue_worker_busy_seconds_total"
    )
    print(f"busy seconds accrued over a 2 s window mid-job: {busy:.2f}")
    assert busy > 1.0, "busy time must accrue while the pipeline call runs"
    assert value(second, "sdqueue_running_jobs", lane="interactive") == 1
    assert value(second, "sdqueue_queue_depth", lane="bulk") == 1 and behind.state() == "queued"
    assert value(second, "sdqueue_queue_depth", lane="interactive") == 0
    from sdqueue_worker.metrics import AT_START_METRICS

    assert set(AT_START_METRICS) <= {name for name, _ in second}, "what the dashboard check assumes"
    info = [labels for (name, labels) in second if name == "sdqueue_build_info"]
    assert len(info) == 1 and dict(info[0])["version"] and dict(info[0])["model"]
    behind.wait(timeout=120)
    before = scrape(stack)
    raw = queue.celery.send_task(
        "sdqueue.txt2img", queue="sdqueue.interactive", kwargs={"prompt": "raw", **SMALL}
    )
    raw.get(timeout=120)
    after = scrape(stack)
    key = {"lane": "interactive", "source": "worker_received"}
    moved = value(after, "sdqueue_queue_wait_seconds_count", **key) - value(
        before, "sdqueue_queue_wait_seconds_count", **key
    )
    assert moved == 1, "a client without the header still gets its queue wait recorded"
    # the result is stored before the task's end hook lowers the gauge: poll briefly
    deadline = time.monotonic() + 10
    while value(after, "sdqueue_running_jobs", lane="interactive") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        after = scrape(stack)
    assert value(after, "sdqueue_running_jobs", lane="interactive") == 0
