"""What the HTTP front door costs: submit latency against ``SdQueue.submit`` and the sustained rate.

    .venv/bin/python -m benchmarks.server_load [--latency-jobs 1000] [--load-jobs 6000] [--connections 16]

Starts a real redis-server and ``sdqueue serve`` (one process, one API key, so the key lookup, rate
limit and quota run on every submit); no worker, so jobs only queue. The in-process client is
measured without Celery's task-sent event, which the server does not publish either. Then, on loopback:

* latency: ``--latency-jobs`` submits one at a time, first with ``SdQueue.submit`` in this process,
  then as ``POST /v1/jobs`` over one keep-alive connection; p50/p90/p99 of each and the difference.
* direct load: the same client in this process from ``--connections`` threads (its own ceiling
  on this machine at this moment, for comparison);
* load: ``--load-jobs`` submits over ``--connections`` keep-alive connections from a small asyncio
  HTTP/1.1 generator (raw sockets, so the generator takes little of the CPU it shares with the
  server), stopped after ``--max-seconds``, ``--runs`` times; the rate counts 202 answers only. Each
  run records the server's CPU time, so ``submits_per_s_per_full_core`` says what one process does
  when it has a core to itself (the machine this ran on is shared: see ``server_cpu_share``).

Bounded in count and time. Writes ``benchmarks/results/server-load-cpu-<date>.json`` with the load
average before and after (other processes share this machine's CPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from devstack.server import ServerProcess
from devstack.services import RedisServer, stack_env
from sdqueue import SdQueue
from sdqueue.server.keys import hash_key
from sdqueue.settings import Settings

KEY = "sdq_bench_key"
JOB = {"mode": "txt2img", "prompt": "a small red boat", "width": 64, "height": 64, "steps": 1}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 0.5) * 1000, 3),
        "p90_ms": round(percentile(values, 0.9) * 1000, 3),
        "p99_ms": round(percentile(values, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
    }


def client(settings: Settings) -> SdQueue:
    """The client without the task-sent event, which the server does not publish either: like for like."""
    queue = SdQueue(settings)
    queue.celery.conf.task_send_sent_event = False
    return queue


def direct_latency(settings: Settings, n: int) -> list[float]:
    queue = client(settings)
    for _ in range(20):
        queue.submit({**JOB, "job_id": os.urandom(8).hex()})
    out = []
    for i in range(n):
        started = time.perf_counter()
        queue.submit({**JOB, "job_id": f"direct-{i}-{os.urandom(4).hex()}"})
        out.append(time.perf_counter() - started)
    return out


def http_latency(port: int, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps(JOB)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    out = []
    for i in range(n + 20):
        started = time.perf_counter()
        conn.request("POST", "/v1/jobs", body, headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 202, response.status
        if i >= 20:
            out.append(time.perf_counter() - started)
    conn.close()
    return out


def direct_rate(settings: Settings, n: int, threads: int) -> dict[str, Any]:
    """The bare client's own ceiling on this machine now: ``threads`` threads calling SdQueue.submit."""
    queue = client(settings)
    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: queue.submit({**JOB, "job_id": f"rate-{i}-{os.urandom(4).hex()}"}), range(n)))
    elapsed = time.perf_counter() - started
    return {
        "submits": n,
        "threads": threads,
        "submits_per_s": round(n / elapsed, 1),
        "cpu_us_per_submit": round((time.process_time() - cpu) / n * 1e6, 1),
    }


async def _connection(port: int, request: bytes, counter: dict[str, int], total: int, stop_at: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while counter["sent"] < total and time.monotonic() < stop_at:
            counter["sent"] += 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            key = "ok" if head.startswith(b"HTTP/1.1 202") else "other"
            counter[key] += 1
    finally:
        writer.close()


async def load(port: int, total: int, connections: int, max_s: float) -> dict[str, Any]:
    body = json.dumps(JOB).encode()
    request = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    counter = {"sent": 0, "ok": 0, "other": 0}
    started = time.monotonic()
    await asyncio.gather(
        *(_connection(port, request, counter, total, started + max_s) for _ in range(connections))
    )
    elapsed = time.monotonic() - started
    return {
        "submits": counter["ok"],
        "refused": counter["other"],
        "seconds": round(elapsed, 3),
        "submits_per_s": round(counter["ok"] / elapsed, 1),
        "connections": connections,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_run(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    """One bounded load phase, with the server process's own CPU time over it."""
    cpu_before = cpu_seconds(server.pid)
    rate = asyncio.run(load(server.port, args.load_jobs, args.connections, args.max_seconds))
    rate["server_cpu_s"] = round(cpu_seconds(server.pid) - cpu_before, 2)
    rate["server_cpu_us_per_submit"] = round(rate["server_cpu_s"] / max(rate["submits"], 1) * 1e6, 1)
    rate["server_cpu_share"] = round(rate["server_cpu_s"] / rate["seconds"], 2)
    rate["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-jobs", type=int, default=1000)
    parser.add_argument("--load-jobs", type=int, default=6000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=3, help="load phases (the median is reported)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    load_before = os.getloadavg()
    logdir = Path(tempfile.mkdtemp(prefix="sdq-bench-server-"))
    redis = RedisServer(logdir).start()
    env = stack_env(
        redis.url,
        "http://127.0.0.1:9",
        ".cache/tiny-sd",
        api_keys=f"bench:{hash_key(KEY)}",
        rate_per_minute=10**9,
        rate_burst=10**6,
        max_concurrent=10**6,
    )
    server = ServerProcess(logdir, env).start()
    try:
        settings = Settings(redis_url=redis.url, s3_endpoint_url="http://127.0.0.1:9")
        direct = direct_latency(settings, args.latency_jobs)
        via_http = http_latency(server.port, args.latency_jobs)
        direct_load = direct_rate(settings, min(args.load_jobs, 3000), args.connections)
        runs = [load_run(server, args) for _ in range(args.runs)]
    finally:
        server.stop()
        redis.stop()
    result = {
        "what": "POST /v1/jobs through one sdqueue serve process vs SdQueue.submit, loopback, no worker",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "latency_direct": summary_ms(direct),
        "latency_http": summary_ms(via_http),
        "added_p50_ms": round((percentile(via_http, 0.5) - percentile(direct, 0.5)) * 1000, 3),
        "load_runs": runs,
        "load_median_submits_per_s": statistics.median(r["submits_per_s"] for r in runs),
        "server_cpu_us_per_submit_median": statistics.median(r["server_cpu_us_per_submit"] for r in runs),
        "submits_per_s_per_full_core": round(
            1e6 / statistics.median(r["server_cpu_us_per_submit"] for r in runs), 1
        ),
        "load_direct_client": direct_load,
        "targets": {"added_p50_ms_max": 5.0, "submits_per_s_min": 500},
    }
    print(json.dumps(result, indent=1))
    out = Path(args.out) / f"server-load-cpu-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
