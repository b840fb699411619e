"""Enqueue rate of ``sdqueue bulk`` against a real redis-server, and the interactive lane behind it.

    .venv/bin/python -m benchmarks.bulk_enqueue [--count 100000] [--repeat 3] [--probe] [--out FILE.json]

Starts its own redis-server on a free port and measures, on ``count`` txt2img jobs:

* ``bulk_push``: the submit step alone (jobs validated beforehand): claim + template message,
  one Lua script call per 500 jobs (what ``sdqueue bulk`` does per batch);
* ``bulk_run``: the whole ``sdqueue bulk --no-wait`` path from a JSONL file on disk: read,
  validate, content-hash ids, duplicate table, resume check, push;
* ``bulk_sent_events``: Celery's own publish path (``--sent-events``), on fewer jobs;
* ``submit``: ``SdQueue.submit`` one job per round trip.

With ``--probe`` it also starts moto's S3 server and one worker on the tiny model, queues
``count`` bulk jobs and times one interactive job submitted behind them (wall clock from submit
to result, and the worker's own queue-wait figure). Prints jobs/s by wall clock and by the
client's CPU time; the machine's load average is recorded (on a shared machine the wall-clock
figure is the lower bound). With ``--repeat N`` each figure is the median of N runs, all listed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from devstack.services import RedisServer
from sdqueue.bulk import CHUNK, BulkJob, BulkOptions, BulkRun, Preparer
from sdqueue.bulk_input import Row, read_rows
from sdqueue.client import SdQueue
from sdqueue.names import BULK_QUEUE
from sdqueue.settings import Settings

JOB = {"mode": "txt2img", "width": 512, "height": 512, "steps": 25}


def rows(count: int, tag: str) -> Iterator[Row]:
    for i in range(count):
        yield Row(i + 1, {**JOB, "prompt": f"{tag} {i}", "seed": i})


def _figures(count: int, wall: float, cpu: float) -> dict[str, float]:
    return {"jobs": count, "wall_s": wall, "jobs_per_s": count / wall, "client_cpu_jobs_per_s": count / cpu}


def time_bulk(queue: SdQueue, count: int, sent_events: bool) -> dict[str, float]:
    """The submit step alone: jobs validated first, then pushed a batch at a time, no cap."""
    queue.redis.flushall()
    preparer = Preparer(queue, run_name=f"push-{sent_events}")
    jobs = [item for item in preparer(rows(count, "bulk")) if isinstance(item, BulkJob)]
    assert len(jobs) == count
    run = BulkRun(queue, [], preparer, BulkOptions(max_in_flight=0, sent_events=sent_events))
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, count, CHUNK):
        results = run.submitter.push(jobs[start : start + CHUNK], 0)
        assert all(result.pushed for result in results)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert queue.redis.llen(BULK_QUEUE) == count
    return _figures(count, wall, cpu)


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median wall-clock rate."""
    return sorted(runs, key=lambda run: run["jobs_per_s"])[len(runs) // 2]


def write_jobs(path: Path, count: int) -> Path:
    with path.open("w") as out:
        for row in rows(count, "file"):
            out.write(json.dumps(row.spec) + "\n")
    return path


def time_run(queue: SdQueue, path: Path, count: int) -> dict[str, float]:
    """``sdqueue bulk FILE --no-wait`` in-process: read, validate, id, resume check, push."""
    queue.redis.flushall()
    options = BulkOptions(max_in_flight=0, follow=False)
    wall, cpu = time.perf_counter(), time.process_time()
    with path.open() as lines:
        summary = BulkRun(queue, read_rows(lines, "jsonl"), Preparer(queue), options).run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert summary.queued == count and queue.redis.llen(BULK_QUEUE) == count, summary
    return _figures(count, wall, cpu)


def time_submit(queue: SdQueue, count: int) -> dict[str, float]:
    queue.redis.flushall()
    specs = [row.spec or {} for row in rows(count, "one")]
    wall, cpu = time.perf_counter(), time.process_time()
    for spec in specs:
        queue.submit({**spec, "job_id": f"one-{spec['seed']}"}, lane="bulk")
    return _figures(count, time.perf_counter() - wall, time.process_time() - cpu)


def probe_interactive(redis_url: str, count: int, logdir: Path) -> dict[str, Any]:
    """One interactive job's wait behind ``count`` queued bulk jobs, with a real worker."""
    from devstack.services import MotoServer, WorkerProcess, stack_env
    from sdqueue.contract import Txt2ImgJob
    from sdqueue_worker.tiny_model import build_tiny_model

    model = str(build_tiny_model(Path(".cache/tiny-sd")))
    moto = MotoServer(logdir).start()
    env = stack_env(redis_url, moto.url, model)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        os.environ[key] = env[key]
    settings = Settings(redis_url=redis_url, s3_endpoint_url=moto.url, input_buckets=["sdqueue"])
    queue = SdQueue(settings)
    queue.storage.client.create_bucket(Bucket="sdqueue")
    queue.redis.flushall()
    small = {"mode": "txt2img", "width": 64, "height": 64, "steps": 2}
    bulk_rows = (Row(i + 1, {**small, "prompt": f"probe {i}"}) for i in range(count))
    summary = BulkRun(queue, bulk_rows, Preparer(queue), BulkOptions(max_in_flight=0, follow=False)).run()
    worker = WorkerProcess(logdir, env, name="probe").start()
    try:
        queue.submit(Txt2ImgJob(**{**small, "prompt": "warm-up"}), lane="interactive").wait(timeout=120)
        deadline = time.monotonic() + 120
        while queue.redis.llen(BULK_QUEUE) > count - 5 and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker is busy with bulk jobs when the interactive one arrives
        waiting_before = queue.redis.llen(BULK_QUEUE)
        began = time.perf_counter()
        result = queue.submit(Txt2ImgJob(**{**small, "prompt": "interactive"})).wait(timeout=120)
        latency = time.perf_counter() - began
        waiting_after = queue.redis.llen(BULK_QUEUE)
    finally:
        queue.redis.delete(BULK_QUEUE)
        worker.stop()
        moto.stop()
    return {
        "worker": "one worker process, tiny model, CPU, 64x64, 2 steps",
        "bulk_jobs_queued": summary.queued,
        "bulk_waiting_at_submit": waiting_before,
        "bulk_waiting_at_result": waiting_after,
        "interactive_submit_to_result_s": latency,
        "interactive_queue_wait_s": result.timings.get("queue_wait_s"),
        "interactive_job_total_s": result.timings.get("total_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--events-count", type=int, default=10_000)
    parser.add_argument("--submit-count", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (median reported)")
    parser.add_argument(
        "--probe", action="store_true", help="also time an interactive job behind the bulk jobs"
    )
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` still stops the services
    logdir = Path(tempfile.mkdtemp(prefix="sdq-bench-"))
    load_before = os.getloadavg()[0]
    redis = RedisServer(logdir).start()
    try:
        queue = SdQueue(Settings(redis_url=redis.url))
        jobs_file = write_jobs(logdir / "jobs.jsonl", args.count)
        measures = {
            "bulk_push": lambda: time_bulk(queue, args.count, False),
            "bulk_run": lambda: time_run(queue, jobs_file, args.count),
            "bulk_sent_events": lambda: time_bulk(queue, args.events_count, True),
            "submit": lambda: time_submit(queue, args.submit_count),
        }
        result: dict[str, Any] = {"repeats": args.repeat}
        for name, measure in measures.items():
            runs = [measure() for _ in range(args.repeat)]
            result[name] = {**median_run(runs), "all_jobs_per_s": [round(run["jobs_per_s"]) for run in runs]}
        if args.probe:
            result["interactive_probe"] = probe_interactive(redis.url, args.count, logdir)
    finally:
        redis.stop()
    result["machine"] = {
        "cpus": os.cpu_count(),
        "load_avg_1m_before": round(load_before, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "note": "2-core VM shared with other jobs; load average = runnable processes",
    }
    report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def report(result: dict[str, Any]) -> None:
    for name, label in (
        ("bulk_push", "bulk push (script)"),
        ("bulk_run", "bulk run from file"),
        ("bulk_sent_events", "bulk, --sent-events"),
        ("submit", "SdQueue.submit 1 by 1"),
    ):
        figures = result[name]
        print(
            f"{label:22} {figures['jobs_per_s']:7.0f} jobs/s wall ({figures['jobs']} jobs in "
            f"{figures['wall_s']:.2f}s), {figures['client_cpu_jobs_per_s']:7.0f} jobs/s per client CPU s, "
            f"runs {figures['all_jobs_per_s']}"
        )
    if "interactive_probe" in result:
        print(f"interactive probe: {result['interactive_probe']}")
    print(f"machine: {result['machine']}")


if __name__ == "__main__":
    main()
