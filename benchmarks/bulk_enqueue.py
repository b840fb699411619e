"""Enqueue rate of ``sdqueue bulk`` (and of one-by-one ``SdQueue.submit``) against a real redis-server.

    .venv/bin/python -m benchmarks.bulk_enqueue [--count 20000] [--out benchmarks/results/bulk_enqueue.json]

Starts its own redis-server on a free port (no worker: only the enqueue side is measured),
validates ``count`` txt2img jobs, then times the bulk path (pipelined idempotency claims,
batched Celery publishes, one connection), the same with Celery's task-sent events
(``--sent-events``), and the interactive path (one submit per round trip). Prints jobs/s by wall
clock and by the client's own CPU time (on a busy machine the wall-clock figure is the lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from devstack.services import RedisServer
from sdqueue.bulk import CHUNK, BulkOptions, BulkRun, prepare
from sdqueue.bulk_input import Row
from sdqueue.client import SdQueue
from sdqueue.names import BULK_QUEUE
from sdqueue.settings import Settings


def rows(count: int, tag: str) -> list[Row]:
    return [
        Row(
            i + 1,
            {"mode": "txt2img", "prompt": f"{tag} {i}", "width": 512, "height": 512, "steps": 25, "seed": i},
        )
        for i in range(count)
    ]


def time_bulk(queue: SdQueue, count: int, sent_events: bool) -> dict[str, float]:
    queue.redis.flushall()
    jobs, errors = prepare(queue, rows(count, "bulk"))
    assert not errors, errors[:3]
    run = BulkRun(queue, jobs, BulkOptions(max_in_flight=count, sent_events=sent_events))
    run.resume()
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, count, CHUNK):
        run.enqueuer.submit(jobs[start : start + CHUNK])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert queue.redis.llen(BULK_QUEUE) == count
    return {"jobs": count, "wall_s": wall, "jobs_per_s": count / wall, "client_cpu_jobs_per_s": count / cpu}


def time_submit(queue: SdQueue, count: int) -> dict[str, float]:
    specs = [row.spec for row in rows(count, "one")]
    wall, cpu = time.perf_counter(), time.process_time()
    for spec in specs:
        queue.submit({**(spec or {}), "job_id": f"one-{spec and spec['seed']}"}, lane="bulk")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"jobs": count, "wall_s": wall, "jobs_per_s": count / wall, "client_cpu_jobs_per_s": count / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--submit-count", type=int, default=1000)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="sdq-bench-"))).start()
    try:
        queue = SdQueue(Settings(redis_url=redis.url))
        result: dict[str, Any] = {
            "bulk": time_bulk(queue, args.count, False),
            "bulk_sent_events": time_bulk(queue, args.count, True),
        }
        queue.redis.flushall()
        result["submit"] = time_submit(queue, args.submit_count)
    finally:
        redis.stop()
    result["machine"] = {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    for name, label in (
        ("bulk", "sdqueue bulk enqueue"),
        ("bulk_sent_events", "bulk, --sent-events"),
        ("submit", "SdQueue.submit one by one"),
    ):
        figures = result[name]
        print(
            f"{label:26} {figures['jobs_per_s']:6.0f} jobs/s wall ({figures['jobs']} jobs in "
            f"{figures['wall_s']:.2f}s), {figures['client_cpu_jobs_per_s']:6.0f} jobs/s per client CPU s"
        )
    print(f"machine: {result['machine']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
