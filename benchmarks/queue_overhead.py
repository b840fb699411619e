"""Queue overhead on the CPU with the tiny model: what sdqueue adds around the pipeline call.

    make bench-queue          # or: .venv/bin/python -m benchmarks.queue_overhead [--jobs 100]

Starts a real redis-server, moto's S3 server and one worker process, then runs ``--jobs``
interactive jobs one at a time and measures, per job: enqueue -> task start (queue wait),
submit -> result in hand (end to end), and the pipeline call inside the worker. The baseline in
the same run is the bare pipeline call for the same job in this process. Also measures the bulk
enqueue rate. Writes ``benchmarks/results/queue-overhead-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bulk_enqueue import time_bulk
from devstack.services import MotoServer, RedisServer, WorkerProcess, stack_env
from sdqueue import SdQueue, Txt2ImgJob
from sdqueue.settings import Settings
from sdqueue_worker.runtime import load_runtime
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.tiny_model import build_tiny_model

JOB = dict(prompt="a small red boat", width=64, height=64, steps=1, guidance_scale=7.5, scheduler="euler")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bare_call(model: str):  # type: ignore[no-untyped-def]
    """The same job as a bare pipeline call in this process (the baseline)."""
    runtime = load_runtime(WorkerSettings(model=model, device="cpu"))
    pipe = runtime.txt2img
    pipe.scheduler = runtime.schedulers["euler"]

    def call() -> float:
        began = time.perf_counter()
        with torch.inference_mode():
            pipe(
                [JOB["prompt"]],
                width=64,
                height=64,
                num_inference_steps=1,
                output_type="pt",
                generator=[torch.Generator().manual_seed(1)],
            )
        return time.perf_counter() - began

    return call


def run_jobs(queue: SdQueue, count: int, bare) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """Queued jobs one at a time, each right after a bare call, so both see the same machine load."""
    figures: dict[str, list[float]] = {
        "end_to_end_s": [],
        "queue_wait_s": [],
        "generate_s": [],
        "outside_s": [],
        "bare_pipeline_s": [],
    }
    for seed in range(count + 3):
        bare_s = bare()
        began = time.perf_counter()
        result = queue.submit(Txt2ImgJob(seed=seed, **JOB)).wait(timeout=120)
        elapsed = time.perf_counter() - began
        if seed < 3:
            continue  # warm-up
        figures["bare_pipeline_s"].append(bare_s)
        figures["end_to_end_s"].append(elapsed)
        figures["queue_wait_s"].append(result.timings["queue_wait_s"])
        figures["generate_s"].append(result.timings["generate_s"])
        figures["outside_s"].append(elapsed - result.timings["generate_s"])
    return figures


def summarise(figures: dict[str, list[float]]) -> dict[str, float]:
    summary = {}
    for name, values in figures.items():
        summary[f"{name}_p50"] = statistics.median(values)
        summary[f"{name}_p99"] = percentile(values, 0.99)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--bulk", type=int, default=20000)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    model = str(build_tiny_model(Path(".cache/tiny-sd")))
    workdir = Path(tempfile.mkdtemp(prefix="sdq-qbench-"))
    redis, moto = RedisServer(workdir).start(), MotoServer(workdir).start()
    try:
        env = stack_env(redis.url, moto.url, model, device="cpu")
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        queue = SdQueue(Settings(redis_url=redis.url, s3_endpoint_url=moto.url))
        queue.storage.client.create_bucket(Bucket="sdqueue")
        worker = WorkerProcess(workdir, env, name="qbench").start()
        try:
            results: dict[str, Any] = summarise(run_jobs(queue, args.jobs, bare_call(model)))
        finally:
            worker.stop()
        results["bulk_enqueue_jobs_per_s"] = time_bulk(queue, args.bulk, False)["jobs_per_s"]
    finally:
        redis.stop()
        moto.stop()
    results["end_to_end_over_bare_p50"] = results["end_to_end_s_p50"] / results["bare_pipeline_s_p50"]
    results.update(
        jobs=args.jobs,
        job=JOB,
        date=time.strftime("%Y-%m-%d"),
        machine={
            "device": "cpu",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
    )
    out = Path(args.out) / f"queue-overhead-cpu-{results['date']}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    for key in ("queue_wait_s", "outside_s", "end_to_end_s", "generate_s"):
        print(
            f"{key:14} p50 {results[key + '_p50'] * 1000:7.1f} ms   p99 {results[key + '_p99'] * 1000:7.1f} ms"
        )
    print(
        f"bare pipeline  {results['bare_pipeline_s_p50'] * 1000:7.1f} ms; end to end / bare (p50) "
        f"{results['end_to_end_over_bare_p50']:.2f}x; bulk enqueue {results['bulk_enqueue_jobs_per_s']:.0f} jobs/s"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
