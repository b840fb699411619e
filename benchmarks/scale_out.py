"""Scale-out: one worker per device draining one queue, against one worker, in the same run.

    .venv/bin/python -m benchmarks.scale_out                  # CPU: tiny model, one core per worker
    python -m benchmarks.scale_out --gpus 0,1 --model DIR     # GPU host: one worker per GPU (issue 7)

Both phases start workers through ``sdqueue worker --gpus`` (the one-worker-per-GPU launcher),
submit the same saturated workload of compatible jobs, and check that every job ran exactly once
(one manifest, one recorded delivery). Writes ``benchmarks/results/scale-out-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devstack.services import ROOT, MotoServer, RedisServer, stack_env, wait_for
from sdqueue import SdQueue, Txt2ImgJob
from sdqueue.locations import parse_object_url
from sdqueue.names import deliveries_key
from sdqueue.settings import Settings


def launch(env: dict[str, str], gpus: str, workdir: Path) -> subprocess.Popen[bytes]:
    log = open(workdir / f"launcher-{gpus.replace(',', '_')}.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "sdqueue.cli", "worker", "--gpus", gpus, "--name", "bench"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ready = [Path(f"{env['SDQ_READY_FILE']}.gpu{gpu}") for gpu in gpus.split(",")]
    wait_for(lambda: all(path.exists() for path in ready) or process.poll() is not None, 900, "workers")
    if process.poll() is not None:
        raise RuntimeError(f"launcher exited: see {log.name}")
    return process


def drain(queue: SdQueue, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    job = dict(
        prompt="a saturated queue", width=args.size, height=args.size, steps=args.steps, scheduler="euler"
    )
    queue.submit(Txt2ImgJob(**job, seed=1, job_id=f"{tag}-warm"), lane="bulk").wait(timeout=900)
    began = time.perf_counter()
    handles = [
        queue.submit(Txt2ImgJob(**job, seed=i, job_id=f"{tag}-{i}"), lane="bulk") for i in range(args.jobs)
    ]
    results = [handle.wait(timeout=1800) for handle in handles]
    wall = time.perf_counter() - began
    deliveries = [int(queue.redis.get(deliveries_key(h.job_id, 0)) or 0) for h in handles]
    manifests = [queue.storage.read_json(parse_object_url(r.manifest_url, None)) for r in results]
    return {
        "jobs": args.jobs,
        "wall_s": wall,
        "images_per_s": args.jobs / wall,
        "workers_seen": sorted({m["worker"]["hostname"] for m in manifests}),
        "jobs_lost": sum(1 for r in results if not r.images),
        "jobs_run_more_than_once": sum(1 for d in deliveries if d != 1),
    }


def phase(
    env: dict[str, str], queue: SdQueue, args: argparse.Namespace, gpus: str, workdir: Path
) -> dict[str, Any]:
    process = launch(env, gpus, workdir)
    try:
        return drain(queue, args, f"w{len(gpus.split(','))}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpus", default="", help="e.g. 0,1 on a GPU host; empty: CPU with one core per worker"
    )
    parser.add_argument("--model", default=".cache/tiny-sd")
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    devices = args.gpus or "0,1"
    workdir = Path(tempfile.mkdtemp(prefix="sdq-scale-"))
    redis, moto = RedisServer(workdir, appendonly=True).start(), MotoServer(workdir).start()
    try:
        extra = (
            {"device": "cuda", "max_batch": 8, "compile": "true", "compile_batch_sizes": "1,8"}
            if args.gpus
            else {"device": "cpu"}
        )
        env = stack_env(redis.url, moto.url, args.model, ready_file=str(workdir / "ready"), **extra)
        if not args.gpus:
            env["OMP_NUM_THREADS"] = "1"  # one core per worker, as one GPU per worker
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        queue = SdQueue(Settings(redis_url=redis.url, s3_endpoint_url=moto.url))
        queue.storage.client.create_bucket(Bucket="sdqueue")
        one = phase(env, queue, args, devices.split(",")[0], workdir)
        two = phase(env, queue, args, devices, workdir)
    finally:
        redis.stop()
        moto.stop()
    device = "gpu" if args.gpus else "cpu"
    result = {
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "one_worker": one,
        "two_workers": two,
        "speedup": two["images_per_s"] / one["images_per_s"],
        "cpus": os.cpu_count(),
        "job": {"size": args.size, "steps": args.steps, "model": args.model},
    }
    out = Path(args.out) / f"scale-out-{device}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
