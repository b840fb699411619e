"""``sdqueue bulk`` through the real CLI: JSONL/CSV/stdin, backpressure, resume, report, exit codes,
cancel, and the enqueue rate against a real redis-server."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from devstack.services import MotoServer
from sdqueue.bulk import BulkOptions, BulkRun, prepare
from sdqueue.bulk_input import Row
from sdqueue.client import SdQueue
from sdqueue.names import BULK_QUEUE, job_claim_key
from tests.helpers import own_stack, png_bytes, sdqueue, smooth_image

SMALL = {"mode": "txt2img", "width": 64, "height": 64, "steps": 2}


def write_jsonl(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def report_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary_of(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def result_meta(queue: SdQueue, job_id: str) -> dict[str, Any]:
    return json.loads(queue.redis.get(f"celery-task-meta-{job_id}"))


class QueueDepth:
    """Samples the bulk queue's length in Redis while a run goes on (an independent view)."""

    def __init__(self, queue: SdQueue) -> None:
        self.queue = queue
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append(int(self.queue.redis.llen(BULK_QUEUE)))
            time.sleep(0.01)

    def __enter__(self) -> QueueDepth:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.usefixtures("worker")
def test_jsonl_runs_every_job_under_the_cap_then_resumes(
    env: dict[str, str], queue: SdQueue, s3: Any, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    jobs = [{**SMALL, "prompt": f"bulk {tag} {i}", "num_images": 2 if i == 0 else 1} for i in range(6)]
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)
    with QueueDepth(queue) as depth:
        run = sdqueue(env, "bulk", str(path), "--max-in-flight", "3", "--report", str(tmp_path / "r1.jsonl"))
    assert run.returncode == 0, run.stderr
    summary = summary_of(run.stdout)
    print(
        f"bulk of 6: {summary['images']} images in {summary['elapsed_s']}s; "
        f"queue depth at most {max(depth.samples)} (cap 3)"
    )
    assert (summary["succeeded"], summary["images"], summary["enqueued"]) == (6, 7, 6)
    assert max(depth.samples) <= 3
    report = report_of(tmp_path / "r1.jsonl")
    assert [line["line"] for line in report] == [1, 2, 3, 4, 5, 6]
    assert all(line["state"] == "succeeded" for line in report)
    for url in report[0]["images"]:
        bucket, key = url.removeprefix("s3://").split("/", 1)
        assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    done_at = {line["job_id"]: result_meta(queue, line["job_id"])["date_done"] for line in report}

    write_jsonl(path, jobs + [{**SMALL, "prompt": f"bulk {tag} extra {i}"} for i in range(2)])
    again = sdqueue(env, "bulk", str(path), "--report", str(tmp_path / "r2.jsonl"), "--silent")
    assert again.returncode == 0, again.stderr
    summary = summary_of(again.stdout)
    assert (summary["succeeded"], summary["resumed"], summary["enqueued"]) == (8, 6, 2)
    second = report_of(tmp_path / "r2.jsonl")
    assert [line["job_id"] for line in second[:6]] == [line["job_id"] for line in report]
    rerun_done_at = {job_id: result_meta(queue, job_id)["date_done"] for job_id in done_at}
    assert rerun_done_at == done_at, "the rerun ran finished jobs again"


@pytest.mark.usefixtures("worker")
def test_csv_from_stdin_is_typed_by_the_contract(
    env: dict[str, str], queue: SdQueue, s3: Any, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    csv_text = (
        "prompt,steps,guidance_scale,seed,width,height,output.bucket,output.prefix\n"
        f"csv {tag} a,2,6.5,41,64,64,sdqueue,bulkcsv\n"
        f'"csv {tag}, quoted",3,,,64,72,,\n'
    )
    run = sdqueue(
        env,
        "bulk",
        "-",
        "--format",
        "csv",
        "--mode",
        "txt2img",
        "--report",
        str(tmp_path / "r.jsonl"),
        stdin=csv_text,
    )
    assert run.returncode == 0, run.stderr
    first, second = report_of(tmp_path / "r.jsonl")
    assert (first["line"], second["line"]) == (2, 3)
    bucket, key = first["images"][0].removeprefix("s3://").split("/", 1)
    assert key.startswith("outputs/bulkcsv/"), key
    manifest_key = key.rsplit("/", 1)[0] + "/manifest.json"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    assert manifest["spec"]["steps"] == 2 and manifest["spec"]["guidance_scale"] == 6.5
    assert manifest["seeds"] == [41]
    assert result_meta(queue, second["job_id"])["result"]["images"][0]["height"] == 72


@pytest.mark.usefixtures("worker")
def test_a_failed_job_exits_1_with_its_error_and_retry_failed_reruns_it(
    env: dict[str, str], s3: Any, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    missing = f"bulk/{tag}.png"
    jobs = [
        {**SMALL, "prompt": f"ok {tag}"},
        {
            "mode": "img2img",
            "prompt": "x",
            "image_url": f"s3://inputs/{missing}",
            "width": 64,
            "height": 64,
            "steps": 4,
            "strength": 0.5,
        },
    ]
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)
    run = sdqueue(env, "bulk", str(path), "--report", str(tmp_path / "r.jsonl"))
    assert run.returncode == 1, run.stderr
    assert (summary_of(run.stdout)["succeeded"], summary_of(run.stdout)["failed"]) == (1, 1)
    failed = report_of(tmp_path / "r.jsonl")[1]
    assert failed["state"] == "failed" and "no such object" in failed["error"]

    s3.put_object(Bucket="inputs", Key=missing, Body=png_bytes(smooth_image(3)))
    same = sdqueue(env, "bulk", str(path), "--silent")
    assert same.returncode == 1, "without --retry-failed the failure stands"
    retried = sdqueue(env, "bulk", str(path), "--retry-failed", "--report", str(tmp_path / "r2.jsonl"))
    assert retried.returncode == 0, retried.stderr
    assert summary_of(retried.stdout)["enqueued"] == 1
    assert report_of(tmp_path / "r2.jsonl")[1]["state"] == "succeeded"


def test_invalid_input_is_reported_by_line_and_submits_nothing(
    env: dict[str, str], queue: SdQueue, tmp_path: Path
) -> None:
    job_id = f"never-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({**SMALL, "prompt": "fine", "job_id": job_id})
        + "\n\n"
        + json.dumps({**SMALL, "prompt": "x", "steps": 0})
        + "\n{nope\n"
    )
    for extra in ([], ["--dry-run"]):
        run = sdqueue(env, "bulk", str(path), *extra)
        assert run.returncode == 2
        assert "line 3: invalid job: steps" in run.stderr and "line 4: not valid JSON" in run.stderr
    assert not queue.redis.exists(job_claim_key(job_id))
    path.write_text(json.dumps({**SMALL, "prompt": "fine", "job_id": job_id}) + "\n")
    dry = sdqueue(env, "bulk", str(path), "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout)["job_id"] == job_id
    assert not queue.redis.exists(job_claim_key(job_id))


def test_backpressure_without_a_worker_queues_exactly_the_cap(
    logdir: Path, moto, tiny_model: str, tmp_path: Path
) -> None:
    with own_stack(logdir, moto.url, tiny_model, "bulk-noworker", with_worker=False) as stack:
        path = write_jsonl(tmp_path / "jobs.jsonl", [{**SMALL, "prompt": f"p{i}"} for i in range(20)])
        run = sdqueue(
            stack.env,
            "bulk",
            str(path),
            "--max-in-flight",
            "5",
            "--timeout",
            "2",
            "--report",
            str(tmp_path / "r.jsonl"),
        )
        queued = stack.queue.redis.llen(BULK_QUEUE)
        print(f"no worker, cap 5: {queued} messages queued, exit {run.returncode}")
        assert run.returncode == 1
        assert queued == 5
        summary = summary_of(run.stdout)
        assert (summary["unfinished"], summary["not_submitted"]) == (5, 15)
        states = [line["state"] for line in report_of(tmp_path / "r.jsonl")]
        assert states == ["unfinished"] * 5 + ["not_submitted"] * 15


@pytest.mark.usefixtures("worker")
def test_a_cancelled_job_is_counted_as_cancelled(env: dict[str, str], queue: SdQueue, tmp_path: Path) -> None:
    long_id = f"bulk-cancel-{uuid.uuid4().hex[:8]}"
    jobs = [{**SMALL, "prompt": "long", "steps": 150, "job_id": long_id}, {**SMALL, "prompt": "short"}]
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not queue.handle(long_id).progress():
            time.sleep(0.05)
        queue.handle(long_id).cancel()

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    run = sdqueue(env, "bulk", str(path), "--report", str(tmp_path / "r.jsonl"))
    canceller.join()
    assert run.returncode == 1, run.stderr
    summary = summary_of(run.stdout)
    assert (summary["cancelled"], summary["succeeded"]) == (1, 1)
    assert report_of(tmp_path / "r.jsonl")[0]["state"] == "cancelled"


def test_bulk_enqueue_rate_against_a_real_redis(logdir: Path, moto: MotoServer, tiny_model: str) -> None:
    """Batched claims and publishes over one connection; prints jobs/s (more: benchmarks/bulk_enqueue.py)."""
    with own_stack(logdir, moto.url, tiny_model, "bulk-rate", with_worker=False) as stack:
        count = 5000
        rows = [Row(i + 1, {**SMALL, "prompt": f"rate {i}"}) for i in range(count)]
        jobs, errors = prepare(stack.queue, rows)
        assert not errors
        run = BulkRun(stack.queue, jobs, BulkOptions(max_in_flight=count))
        run.resume()
        began = time.perf_counter()
        for start in range(0, count, 500):
            run.enqueuer.submit(jobs[start : start + 500])
        rate = count / (time.perf_counter() - began)
        print(f"bulk enqueue: {rate:.0f} jobs/s ({count} jobs: pipelined claims and messages)")
        assert stack.queue.redis.llen(BULK_QUEUE) == count
        message = json.loads(stack.queue.redis.lindex(BULK_QUEUE, -1))
        assert message["headers"]["task"] == "sdqueue.txt2img" and message["headers"]["id"] == jobs[0].job_id
        assert rate > 1000, "far below the 3,900-5,200 jobs/s measured on a 2-core machine"
