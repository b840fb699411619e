"""Infrastructure faults from the hardening issue, with real processes: a worker paused (SIGSTOP)
past the visibility timeout that wakes up after another worker finished its job, and Redis at
``maxmemory`` (``noeviction``) answering "OOM command not allowed" while a job finishes.

One private stack for the module: its own redis-server, two workers (``pa``, ``pb``) with a 5 s
visibility timeout and a 10 s job time limit, and a webhook receiver that counts deliveries.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from devstack.services import MotoServer, RedisServer, WorkerProcess, stack_env, wait_for
from sdqueue import SdQueue, Txt2ImgJob
from tests.helpers import settings_from

pytestmark = pytest.mark.faults

VT = 5
TIME_LIMIT = 10


class Hooks:
    """A webhook receiver recording (job id, state) of every POST."""

    def __init__(self) -> None:
        hooks = self
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))["data"]
                with hooks.lock:
                    hooks.seen.append((data["job_id"], data["state"]))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def of(self, job_id: str) -> list[str]:
        with self.lock:
            return [state for seen_id, state in self.seen if seen_id == job_id]


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    receiver = Hooks()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def stack(logdir: Path, moto: MotoServer, s3: Any, tiny_model: str, hooks: Hooks) -> Iterator[dict[str, Any]]:
    server = RedisServer(logdir).start()
    env = stack_env(
        server.url,
        moto.url,
        tiny_model,
        visibility_timeout_s=VT,
        job_time_limit_s=TIME_LIMIT,
        progress_interval_s=0.1,
        webhook_hosts=f"127.0.0.1:{hooks.port}",
        webhook_secret="test-secret",
    )
    env["OMP_NUM_THREADS"] = "1"
    workers = {name: WorkerProcess(logdir, env, name=name) for name in ("pa", "pb")}
    try:
        yield {
            "redis": server,
            "env": env,
            "queue": SdQueue(settings_from(env)),
            "workers": workers,
            "s3": s3,
        }
    finally:
        for process in workers.values():
            if process.alive():
                process.signal(signal.SIGCONT)
            process.kill()
        server.stop()


def test_a_paused_worker_that_wakes_up_late_records_no_second_outcome(
    stack: dict[str, Any], hooks: Hooks
) -> None:
    """pa starts a job and is paused past the visibility timeout; pb takes the redelivered job and
    finishes it; pa wakes up past the job's time limit. Before: pa failed the finished job and
    notified a second time. Now: one outcome (succeeded), one webhook."""
    queue: SdQueue = stack["queue"]
    paused, other = stack["workers"]["pa"], stack["workers"]["pb"]
    paused.start()
    handle = queue.submit(
        Txt2ImgJob(
            prompt="paused", width=64, height=64, steps=40, webhook_url=f"http://127.0.0.1:{hooks.port}/in"
        )
    )
    wait_for(lambda: handle.progress() is not None, 120, "the job to start on pa")
    os.kill(paused.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        other.start()
        result = handle.wait(timeout=180)
        wait_for(lambda: bool(hooks.of(handle.job_id)), 30, "the webhook")
        wait_for(lambda: time.monotonic() - stopped_at > TIME_LIMIT + 1, TIME_LIMIT + 5, "pa's time limit")
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    mark = f"Task sdqueue.txt2img[{handle.job_id}] succeeded"
    wait_for(lambda: mark in paused.log_path.read_text(errors="replace"), 60, "pa to end its delivery")
    time.sleep(3)  # a second notification would be queued and delivered by now
    print(
        f"pa paused {resumed_at - stopped_at:.1f}s (VT {VT}s, time limit {TIME_LIMIT}s); pb finished the job; "
        f"pa woke up and ended its delivery as succeeded; webhooks: {hooks.of(handle.job_id)}"
    )
    assert handle.state() == "succeeded" and handle.wait(timeout=5).manifest_url == result.manifest_url
    assert hooks.of(handle.job_id) == ["succeeded"], "one outcome, one notification"
    assert mark in other.log_path.read_text(errors="replace"), "pb ran the redelivered job"


def manifest_written(s3: Any, job_id: str) -> bool:
    listing = s3.list_objects_v2(Bucket="sdqueue", Prefix=f"outputs/{job_id}/manifest.json")
    return bool(listing.get("KeyCount"))


def test_redis_out_of_memory_while_a_job_finishes_recovers_by_itself(stack: dict[str, Any]) -> None:
    """Redis at maxmemory with noeviction while the job stores its result: the store is retried,
    and once memory is free the result lands and the next job runs, without a restart."""
    queue: SdQueue = stack["queue"]
    stack["workers"]["pa"].stop()
    worker: WorkerProcess = stack["workers"]["pb"]
    if not worker.alive():
        worker.start()
    client = redis.Redis.from_url(stack["redis"].url)
    handle = queue.submit(Txt2ImgJob(prompt="oom", width=64, height=64, steps=40))
    wait_for(lambda: handle.progress() is not None, 120, "the job to start")
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 4 * 1024 * 1024)
    filler = f"filler-{uuid.uuid4().hex[:6]}"
    index = 0
    try:
        while True:  # fill Redis up to maxmemory
            client.set(f"{filler}:{index}", b"x" * 65536)
            index += 1
    except redis.exceptions.OutOfMemoryError:
        pass
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) // 2)  # and stays full
    full_at = time.monotonic()
    wait_for(lambda: manifest_written(stack["s3"], handle.job_id), 120, "the job's manifest (Redis full)")
    time.sleep(3)  # the result store meets "OOM command not allowed" and retries
    state_while_full = handle.state()
    client.delete(*[f"{filler}:{i}" for i in range(index)])
    client.config_set("maxmemory", 0)
    freed_at = time.monotonic()
    result = handle.wait(timeout=90)
    stored_after = time.monotonic() - freed_at
    began = time.monotonic()
    assert queue.submit(Txt2ImgJob(prompt="after oom", width=64, height=64, steps=2)).wait(timeout=90).images
    next_job = time.monotonic() - began
    print(
        f"Redis full {freed_at - full_at:.1f}s while the job finished (state then: {state_while_full}); "
        f"result stored {stored_after:.1f}s after memory was freed; next job done in {next_job:.1f}s"
    )
    assert state_while_full == "running", "the result must not be stored while Redis refuses writes"
    assert result.images and handle.state() == "succeeded"
