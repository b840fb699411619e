"""Fault injection with real processes: nothing lost, nothing visibly done twice.

A module-scoped cluster: its own redis-server (AOF on, restarted by one test), a toggleable TCP
proxy in front of the session's moto S3 (outages without losing moto's in-memory state), two
worker processes (``fa``, ``fb``) with a short visibility timeout, and a versioned output bucket
so a test can prove that no object was ever written twice. Tests run in file order and each says
which workers it needs (``cluster.ensure``). A second stack (Redis with TLS and a password, a 2 s
job time limit) covers the security items and the time limit.

Every test prints the figure it measured; docs/reliability.md collects them. The visibility
timeout is 8 s here (``SDQ_FAULTS_VT`` overrides it; production default 20 s).

Worker processes run torch with one thread (``OMP_NUM_THREADS=1``): two workers share two cores.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.exceptions import OperationalError

from devstack.proxy import TcpProxy
from devstack.services import (
    ROOT,
    MotoServer,
    RedisServer,
    WorkerProcess,
    free_port,
    port_open,
    stack_env,
    wait_for,
)
from sdqueue import BrokerUnavailable, JobFailed, JobIdConflict, SdQueue, Txt2ImgJob
from sdqueue.celeryconfig import make_celery
from sdqueue.client import JobHandle
from sdqueue.names import NOTIFY_QUEUE, TXT2IMG_TASK, deliveries_key, run_lease_key, worker_alive_key
from tests.helpers import own_stack, png_bytes, settings_from, smooth_image

pytestmark = pytest.mark.faults

VT = int(os.environ.get("SDQ_FAULTS_VT", "8"))
BUCKET = "faults"
SHORT = dict(prompt="short", width=64, height=64, steps=2)
MEDIUM = dict(prompt="medium", width=64, height=64, steps=100)  # ~6 s on one CPU thread
QUEUE_KEYS = ("sdqueue.interactive*", "sdqueue.bulk*")
WEBHOOK_HOST = "127.0.0.1:9"


# --- small helpers ----------------------------------------------------------------------------


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll until ``check()`` is truthy; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not after {timeout:.0f}s")
        time.sleep(every)
    return time.monotonic() - started


def deliveries(queue: SdQueue, job_id: str, attempt: int = 0) -> int:
    """How many times the worker started this message (the poison counter)."""
    return int(queue.redis.get(deliveries_key(job_id, attempt)) or 0)


def lease_owner(queue: SdQueue, job_id: str) -> tuple[str, str] | None:
    """(worker hostname, token) of the run lease, or None when nobody runs the job."""
    token = queue.redis.get(run_lease_key(job_id))
    return (token.rsplit(":", 1)[0], token) if token else None


def mid_job(handle: JobHandle, at_least: float = 0.15) -> bool:
    progress = handle.progress()
    return bool(progress) and at_least <= progress["fraction"] < 0.9


def idle(queue: SdQueue) -> bool:
    """No message waiting in a queue nor held unacknowledged by a worker."""
    waiting = sum(queue.redis.llen(key) for pattern in QUEUE_KEYS for key in queue.redis.keys(pattern))
    return waiting == 0 and queue.redis.hlen("unacked") == 0


def wait_idle(queue: SdQueue, timeout: float = 90) -> None:
    wait_until(lambda: idle(queue) and (time.sleep(0.5) or idle(queue)), timeout, "queue idle", every=0.2)


def wait_state(handle: JobHandle, states: set[str], timeout: float) -> str:
    """Poll the state (no pub/sub), robust across Redis restarts."""
    seen: list[str] = []

    def check() -> bool:
        try:
            seen.append(handle.state())
        except redis.RedisError:
            return False
        return seen[-1] in states

    wait_until(check, timeout, f"job {handle.job_id} in {states} (last {seen[-1:]})", every=0.2)
    return seen[-1]


def heartbeat(queue: SdQueue, hostname: str) -> dict[str, Any]:
    body = queue.redis.get(worker_alive_key(hostname))
    return json.loads(body) if body else {}


def generations(queue: SdQueue, hostnames: list[str], after: float | None = None) -> int:
    """Pipeline calls the workers have made (their heartbeats count them), from heartbeats
    written after the wall time ``after`` (they come every lease_refresh_s)."""
    if after is not None:
        wait_until(
            lambda: all(heartbeat(queue, h).get("at", 0) > after for h in hostnames), 10, "fresh heartbeats"
        )
    return sum(heartbeat(queue, h).get("batches", 0) for h in hostnames)


def manifest_keys(s3, job_id: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Key -> number of stored versions, for one job's output folder (the bucket is versioned)."""
    listing = s3.list_object_versions(Bucket=BUCKET, Prefix=f"outputs/{job_id}/")
    counts: dict[str, int] = {}
    for version in listing.get("Versions", []):
        counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


def assert_committed_once(s3, job_id: str, images: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Exactly the job's images and one manifest, each written exactly once; returns the manifest."""
    expected = {f"outputs/{job_id}/{i}.png" for i in range(images)} | {f"outputs/{job_id}/manifest.json"}
    counts = manifest_keys(s3, job_id)
    assert set(counts) == expected, counts
    assert set(counts.values()) == {1}, f"an object was written twice: {counts}"
    return json.loads(s3.get_object(Bucket=BUCKET, Key=f"outputs/{job_id}/manifest.json")["Body"].read())


def assert_manifests_point_at_images(s3) -> int:  # type: ignore[no-untyped-def]
    """Every manifest in the bucket names images that exist with the recorded hash."""
    import hashlib

    checked = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="outputs/"):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("manifest.json"):
                continue
            manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read())
            for image in manifest["images"]:
                body = s3.get_object(Bucket=image["bucket"], Key=image["key"])["Body"].read()
                assert hashlib.sha256(body).hexdigest() == image["sha256"], image["key"]
            checked += 1
    return checked


# --- the cluster -------------------------------------------------------------------------------


@dataclass
class Cluster:
    """Redis (AOF), an S3 proxy, named workers and a client, all for this module."""

    logdir: Path
    redis: RedisServer
    proxy: TcpProxy
    env: dict[str, str]
    queue: SdQueue
    s3: Any
    workers: dict[str, WorkerProcess] = field(default_factory=dict)

    def worker(self, name: str) -> WorkerProcess:
        if name not in self.workers:
            self.workers[name] = WorkerProcess(self.logdir, self.env, name=name)
        return self.workers[name]

    def ensure(self, *names: str) -> list[WorkerProcess]:
        """Exactly these workers alive (the others stopped warm); starts run in parallel."""
        for name, process in self.workers.items():
            if name not in names and process.alive():
                process.stop()
        starting = [self.worker(name) for name in names if not self.worker(name).alive()]
        for process in starting:
            process.start(wait=False)
        for process in starting:
            process.wait_ready()
        return [self.workers[name] for name in names]

    def ensure_single(self) -> WorkerProcess:
        """One worker alive: the first one already running (no restart), else ``fa``."""
        alive = [name for name, process in self.workers.items() if process.alive()]
        return self.ensure(alive[0] if alive else "fa")[0]

    def by_hostname(self, hostname: str) -> WorkerProcess:
        return next(w for w in self.workers.values() if w.hostname == hostname)


def worker_env(redis_url: str, s3_url: str, model: str, **overrides: Any) -> dict[str, str]:
    env = stack_env(redis_url, s3_url, model, visibility_timeout_s=VT, output_bucket=BUCKET, **overrides)
    env["OMP_NUM_THREADS"] = "1"
    return env


def ensure_bucket(s3) -> None:  # type: ignore[no-untyped-def]
    """The output bucket, versioned: every overwrite would leave a second version."""
    if BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})


@pytest.fixture(scope="module")
def cluster(logdir: Path, moto: MotoServer, s3, tiny_model: str) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    ensure_bucket(s3)
    server = RedisServer(logdir, appendonly=True).start()
    proxy = TcpProxy(moto.port).start()
    env = worker_env(
        server.url,
        proxy.url,
        tiny_model,
        max_retries=3,
        retry_backoff_s=0.5,
        retry_backoff_max_s=4,
        progress_interval_s=0.1,
        webhook_hosts=WEBHOOK_HOST,  # queued on sdqueue.notify, never delivered: no notifier runs here
    )
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        os.environ[key] = env[key]
    cluster = Cluster(logdir, server, proxy, env, SdQueue(settings_from(env)), s3)
    try:
        yield cluster
    finally:
        for process in cluster.workers.values():
            process.kill()
        proxy.close()
        server.stop()


_FAILED_BEFORE: list[int] = [0]


@pytest.fixture(autouse=True)
def _clean_broker_after_a_failure(request: pytest.FixtureRequest) -> None:
    """A test that failed may leave its job queued or unacknowledged on the shared cluster, and the
    next tests would then fail on "queue idle" for a fault that is not theirs. After a failure only,
    that leftover is removed (and printed); a passing test's leak still fails the test after it."""
    failed = request.session.testsfailed
    if failed > _FAILED_BEFORE[0] and "cluster" in request.fixturenames:
        queue = request.getfixturevalue("cluster").queue
        keys = [key for pattern in QUEUE_KEYS for key in queue.redis.keys(pattern)]
        keys += ["unacked", "unacked_index", "unacked_mutex"]
        print(f"after a failed test: removing {queue.redis.hlen('unacked')} unacked and the lists {keys}")
        queue.redis.delete(*keys)
    _FAILED_BEFORE[0] = failed


def start_long_job(cluster: Cluster, spec: dict[str, Any]) -> JobHandle:
    handle = cluster.queue.submit(Txt2ImgJob(**spec))
    wait_until(lambda: mid_job(handle), 120, "job running")
    return handle


# --- 1. the lease renewal: a live worker keeps its job ------------------------------------------


def long_job_spec(queue: SdQueue, seconds: float) -> dict[str, Any]:
    """A 150-step job sized to run about ``seconds`` on this machine, from a timed 30-step one."""
    probe = queue.submit(Txt2ImgJob(prompt="probe", width=64, height=64, steps=30)).wait(timeout=120)
    per_image = probe.timings["generate_s"] * 150 / 30
    return dict(
        prompt="long", width=64, height=64, steps=150, num_images=min(8, math.ceil(seconds / per_image))
    )


def test_live_worker_keeps_its_job_past_the_visibility_timeout(cluster: Cluster) -> None:
    """The key property of the lease keeper: a job running 2x+ the visibility timeout on a live
    worker is not redelivered to the idle second worker (kombu alone would hand it over)."""
    cluster.ensure("fa", "fb")
    spec = long_job_spec(cluster.queue, 4 * VT)  # margin: the machine may speed up after the probe
    hostnames = [w.hostname for w in cluster.workers.values()]
    before = generations(cluster.queue, hostnames, after=time.time())
    handle = cluster.queue.submit(Txt2ImgJob(**spec))
    result = handle.wait(timeout=240)
    wait_idle(cluster.queue)
    ran_s = result.timings["generate_s"]
    assert ran_s > 2 * VT, f"premise: the job must outlast 2 x VT={VT}s (ran {ran_s:.1f}s)"
    assert deliveries(cluster.queue, handle.job_id) == 1
    assert deliveries(cluster.queue, handle.job_id, attempt=1) == 0
    assert_committed_once(cluster.s3, handle.job_id, images=spec["num_images"])
    assert generations(cluster.queue, hostnames, after=time.time()) - before == 1
    print(
        f"live worker: job ran {ran_s:.1f}s = {ran_s / VT:.1f}x the visibility timeout ({VT}s); "
        f"deliveries 1, second worker ran nothing"
    )


# --- 5. duplicates ----------------------------------------------------------------------------


def test_same_job_id_submitted_twice_runs_once(cluster: Cluster) -> None:
    job_id = f"dup-{uuid.uuid4().hex[:8]}"
    first = cluster.queue.submit(Txt2ImgJob(job_id=job_id, **SHORT))
    second = cluster.queue.submit(Txt2ImgJob(job_id=job_id, **SHORT))
    assert (first.job_id, second.job_id) == (job_id, job_id)
    with pytest.raises(JobIdConflict, match="different job"):
        cluster.queue.submit(Txt2ImgJob(job_id=job_id, **{**SHORT, "prompt": "another prompt"}))
    started = time.monotonic()
    assert second.wait(timeout=60).images
    wait_idle(cluster.queue)
    assert deliveries(cluster.queue, job_id) == 1
    assert_committed_once(cluster.s3, job_id, images=1)
    print(f"same job id twice: 1 delivery, 1 manifest, done in {time.monotonic() - started:.1f}s")


def test_a_message_delivered_twice_writes_once(cluster: Cluster) -> None:
    """The same task id sent twice by a raw client: both workers get a copy at once; the run
    lease lets one generate, the other retries later and finds the manifest."""
    workers = cluster.ensure("fa", "fb")
    job_id = f"twice-{uuid.uuid4().hex[:8]}"
    payload = dict(prompt="twice", width=64, height=64, steps=40, num_images=2, seed=5)
    hostnames = [w.hostname for w in workers]
    before = generations(cluster.queue, hostnames, after=time.time())
    sent = [
        cluster.queue.celery.send_task(
            TXT2IMG_TASK, kwargs=payload, task_id=job_id, queue="sdqueue.interactive"
        )
        for _ in range(2)
    ]
    started = time.monotonic()
    sent[0].get(timeout=120)
    wait_idle(cluster.queue)
    settled = time.monotonic() - started
    after = generations(cluster.queue, hostnames, after=time.time())
    starts = deliveries(cluster.queue, job_id) + deliveries(cluster.queue, job_id, 1)
    assert starts >= 2, "both copies were taken"
    assert after - before == 1, "exactly one generation"
    manifest = assert_committed_once(cluster.s3, job_id, images=2)
    assert [i["seed"] for i in manifest["images"]] == [5, 6]
    assert cluster.queue.handle(job_id).state() == "succeeded"
    print(f"message delivered twice: {starts} starts, 1 generation, 1 manifest; settled in {settled:.1f}s")


# --- 1. kill -9 mid-job -------------------------------------------------------------------------


LEASE_REFRESH_S = 2.0  # WorkerSettings.lease_refresh_s, the default the cluster runs with
RESTORE_INTERVAL_S = 2.0  # kombu's unacked_restore_interval (sdqueue.celeryconfig)
KILL9 = dict(prompt="kill -9", width=128, height=128, steps=150)  # 10-40 s: outlives two re-stamps


def unacked_stamp(queue: SdQueue, job_id: str) -> float | None:
    """The ``unacked_index`` score (delivery/lease stamp) of the message carrying this job."""
    for tag, raw in queue.redis.hgetall("unacked").items():
        if json.loads(raw)[0]["headers"].get("id") == job_id:
            score = queue.redis.zscore("unacked_index", tag)
            return None if score is None else float(score)
    return None


def kill_after_two_restamps(queue: SdQueue, handle: JobHandle, victim: WorkerProcess) -> tuple[float, float]:
    """SIGKILL the victim once its lease keeper has re-stamped the job's message twice; returns
    (the last stamp, the wall time of the kill). A stamp must be the time it was written."""
    stamps: list[float] = []

    def moved_twice() -> bool:
        stamp = unacked_stamp(queue, handle.job_id)
        if stamp is not None and (not stamps or stamp != stamps[-1]):
            stamps.append(stamp)
            assert stamp <= time.time() + 0.5, f"a lease stamp lies in the future: {stamp - time.time():.1f}s"
        return len(stamps) >= 3

    try:
        wait_until(moved_twice, 60, "two lease re-stamps", every=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; stamps seen {stamps}, progress {handle.progress()}") from None
    assert (handle.progress() or {}).get("fraction", 0) < 0.9, "premise: the job outlives two re-stamps"
    victim.kill()
    killed = time.time()
    last = unacked_stamp(queue, handle.job_id)
    assert last is not None and killed - LEASE_REFRESH_S - 2 <= last <= killed, (last, killed)
    return last, killed


def restore_lock_expiry_s(queue: SdQueue) -> float:
    """The expiry kombu gives its restore-sweep lock under this configuration (or its default)."""
    from kombu.transport.redis import Channel

    options = queue.celery.conf.broker_transport_options
    return float(options.get("unacked_mutex_expire", Channel.unacked_mutex_expire))


def wait_redelivery(queue: SdQueue, job_id: str, timeout: float) -> float:
    """Wall time at which the job's message was started a second time."""
    wait_until(lambda: deliveries(queue, job_id) >= 2, timeout, "redelivery")
    return time.time()


def test_kill9_mid_job_a_second_worker_takes_over(cluster: Cluster) -> None:
    cluster.ensure("fa", "fb")
    handle = start_long_job(cluster, KILL9)
    owner = lease_owner(cluster.queue, handle.job_id)
    assert owner is not None
    victim = cluster.by_hostname(owner[0])
    survivor = next(w for w in cluster.workers.values() if w is not victim)
    last_stamp, killed = kill_after_two_restamps(cluster.queue, handle, victim)
    redelivered = wait_redelivery(cluster.queue, handle.job_id, 3 * VT + 30)
    result = handle.wait(timeout=120)
    manifest = assert_committed_once(cluster.s3, handle.job_id, images=1)
    assert manifest["worker"]["pid"] == survivor.pid
    assert deliveries(cluster.queue, handle.job_id) == 2 and result.images
    bound = VT + RESTORE_INTERVAL_S + LEASE_REFRESH_S + 3
    assert redelivered - last_stamp <= bound, f"back {redelivered - last_stamp:.1f}s after the last stamp"
    print(
        f"kill -9 after two lease re-stamps, no restart: the other worker started it again "
        f"{redelivered - last_stamp:.1f}s after the dead worker's last stamp ({redelivered - killed:.1f}s "
        f"after the kill; VT {VT}s, bound {bound:.0f}s)"
    )


def test_kill9_mid_job_then_restart(cluster: Cluster) -> None:
    """Also: the dead worker died inside kombu's restore sweep, holding its lock (``unacked_mutex``,
    taken every 2 s). The lock is left behind as redis-py's Lock writes it, with the expiry the
    configuration gives it; the restarted worker must still redeliver within the usual bound
    (kombu's default expiry, five minutes, would hold the job back that long)."""
    worker = cluster.ensure_single()
    handle = start_long_job(cluster, KILL9)
    last_stamp, killed = kill_after_two_restamps(cluster.queue, handle, worker)
    lock_s = restore_lock_expiry_s(cluster.queue)
    cluster.queue.redis.set("unacked_mutex", "dead-worker-token", nx=True, px=int(lock_s * 1000))
    worker.start()
    ready = time.time()
    redelivered = wait_redelivery(cluster.queue, handle.job_id, 3 * VT + 30)
    result = handle.wait(timeout=120)
    manifest = assert_committed_once(cluster.s3, handle.job_id, images=1)
    assert manifest["worker"]["pid"] == worker.pid and result.images
    assert deliveries(cluster.queue, handle.job_id) == 2
    # restored once the worker is up, the message is due and the dead worker's lock has expired
    due = max(ready, last_stamp + VT, killed + lock_s)
    assert redelivered - due <= RESTORE_INTERVAL_S + LEASE_REFRESH_S + 3, redelivered - due
    print(
        f"kill -9 after two re-stamps, restart at once: running again {redelivered - killed:.1f}s after the "
        f"kill ({ready - killed:.1f}s start-up; {redelivered - last_stamp:.1f}s after the last stamp, VT {VT}s)"
    )


# --- 8. an error inside the pipeline: a real out-of-memory ---------------------------------------


def vm_kib(pid: int, field_name: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def test_out_of_memory_inside_the_pipeline_fails_alone(cluster: Cluster) -> None:
    """The worker gets a fixed memory budget (RLIMIT_AS, as a GPU has a fixed VRAM); an oversized
    request then fails inside the pipeline with a real allocation failure, alone, with a clear
    reason; the memory comes back and the worker serves the next job."""
    worker = cluster.ensure_single()
    budget = (vm_kib(worker.pid, "VmSize") + 2 * 1024 * 1024) * 1024  # current + 2 GiB
    resource.prlimit(worker.pid, resource.RLIMIT_AS, (budget, resource.RLIM_INFINITY))
    try:
        rss_before = vm_kib(worker.pid, "VmRSS")
        big = cluster.queue.submit(Txt2ImgJob(prompt="huge", width=2048, height=1024, num_images=8, steps=1))
        good = cluster.queue.submit(Txt2ImgJob(**SHORT))
        started = time.monotonic()
        with pytest.raises(JobFailed) as failure:
            big.wait(timeout=120)
        failed_after = time.monotonic() - started
        assert good.wait(timeout=60).images, "the next job must run on the same worker"
        rss_after = vm_kib(worker.pid, "VmRSS")
    finally:
        resource.prlimit(worker.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    reason = failure.value.reason
    assert failure.value.error_type == "GenerationError", failure.value
    assert "allocate memory" in reason or "out of memory" in reason, reason
    assert worker.alive()
    assert rss_after - rss_before < 300 * 1024, f"memory not given back: {rss_before} -> {rss_after} KiB"
    print(
        f"out of memory: failed in {failed_after:.1f}s ({reason[:90]}...); worker RSS "
        f"{rss_before // 1024} -> {rss_after // 1024} MiB; next job served"
    )


# --- 4. S3 outages ----------------------------------------------------------------------------


def upload_input(cluster: Cluster, key: str) -> str:
    cluster.s3.put_object(Bucket="inputs", Key=key, Body=png_bytes(smooth_image(3)))
    return f"s3://inputs/{key}"


def test_s3_outage_during_input_download_is_retried(cluster: Cluster) -> None:
    from sdqueue import Img2ImgJob

    cluster.ensure_single()
    url = upload_input(cluster, f"faults/{uuid.uuid4().hex[:6]}.png")
    blocked_before = cluster.proxy.stats.blocked_requests
    cluster.proxy.block(rb"^(GET|HEAD) /inputs/")
    started = time.monotonic()
    try:
        handle = cluster.queue.submit(Img2ImgJob(image_url=url, prompt="in", width=64, height=64, steps=4))
        wait_until(lambda: deliveries(cluster.queue, handle.job_id, attempt=1) >= 1, 60, "a task-level retry")
    finally:
        cluster.proxy.up()
    outage = time.monotonic() - started
    result = handle.wait(timeout=90)
    retries = max(a for a in range(6) if deliveries(cluster.queue, handle.job_id, a))
    assert cluster.proxy.stats.blocked_requests > blocked_before
    assert 1 <= retries < 3
    assert_committed_once(cluster.s3, handle.job_id, images=1)
    assert result.raw["images"][0]["key"].endswith("/0.png")
    print(
        f"S3 down for input download {outage:.1f}s: {retries} task retr{'y' if retries == 1 else 'ies'}, "
        f"succeeded {time.monotonic() - started:.1f}s after the outage began"
    )


def test_s3_outage_during_upload_is_retried(cluster: Cluster) -> None:
    cluster.ensure_single()
    handle = start_long_job(cluster, {**MEDIUM, "steps": 40})
    cluster.proxy.down()
    started = time.monotonic()
    try:
        wait_until(lambda: deliveries(cluster.queue, handle.job_id, attempt=1) >= 1, 60, "a task-level retry")
    finally:
        cluster.proxy.up()
    outage = time.monotonic() - started
    result = handle.wait(timeout=90)
    assert len(result.images) == 1
    assert_committed_once(cluster.s3, handle.job_id, images=1)
    checked = assert_manifests_point_at_images(cluster.s3)
    print(
        f"S3 down during upload {outage:.1f}s: retried, succeeded {time.monotonic() - started:.1f}s after "
        f"the outage began; {checked} manifests all point at existing images"
    )


def test_s3_outage_longer_than_the_retries_fails_clearly(cluster: Cluster) -> None:
    cluster.ensure_single()
    cluster.proxy.down()
    started = time.monotonic()
    try:
        handle = cluster.queue.submit(Txt2ImgJob(**SHORT))
        with pytest.raises(JobFailed) as failure:
            handle.wait(timeout=120)
    finally:
        cluster.proxy.up()
    gave_up = time.monotonic() - started
    reason = failure.value.reason
    assert failure.value.error_type == "TransientError", failure.value
    assert "storage" in reason and "gave up after 4 attempts" in reason, reason
    assert manifest_keys(cluster.s3, handle.job_id) == {}
    assert cluster.queue.submit(Txt2ImgJob(**SHORT)).wait(timeout=60).images
    print(f"S3 down for good: failed after {gave_up:.1f}s and 3 retries: {reason}")


# --- 7. warm shutdown ------------------------------------------------------------------------------


def test_sigterm_mid_job_finishes_it_then_exits(cluster: Cluster) -> None:
    """Warm shutdown: the running job finishes and is acknowledged before the worker exits."""
    worker = cluster.ensure_single()
    handle = start_long_job(cluster, MEDIUM)  # ~6 s: far inside any stop grace period
    worker.signal(signal.SIGTERM)
    termed = time.monotonic()
    assert worker.proc is not None
    worker.proc.wait(120)
    exited = time.monotonic() - termed
    assert manifest_keys(cluster.s3, handle.job_id), "the job must finish before the worker exits"
    assert handle.state() == "succeeded" and idle(cluster.queue), "nothing requeued"
    cluster.ensure("fa", "fb")  # both: the poison test next needs two
    wait_idle(cluster.queue)
    assert deliveries(cluster.queue, handle.job_id) == 1
    assert_committed_once(cluster.s3, handle.job_id, images=1)
    print(f"SIGTERM mid-job: the job finished, then the worker exited {exited:.1f}s after the signal")


COLD = dict(
    prompt="cold shutdown", width=64, height=64, steps=150, num_images=2
)  # ~18 s: outlives the signals
COLD_EXIT_S = 20.0
"""SIGQUIT to exit: the next step (under a second), requeue, consumer and pool teardown, with
headroom for a loaded 2-core machine; the lease would need VT + restore interval and a restart."""


def new_log(process: WorkerProcess, offset: int) -> str:
    """What the process logged after ``offset`` bytes (its log file is shared by its restarts)."""
    with open(process.log_path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def webhooks_queued(queue: SdQueue, job_id: str) -> list[str]:
    """The states the webhooks queued for this job announce (no notifier consumes them here)."""
    states = []
    for raw in queue.redis.lrange(NOTIFY_QUEUE, 0, -1):
        _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
        data = json.loads(kwargs["body"])["data"]
        if data["job_id"] == job_id:
            states.append(data["state"])
    return states


def queued_ids(queue: SdQueue, job_ids: list[str]) -> list[str]:
    """Which of these jobs wait in one queue, next to be taken first (kombu takes from the right).

    Empty when they are not all in one queue, or any of them is still held unacknowledged.
    """
    if any(job_id in raw for raw in queue.redis.hvals("unacked") for job_id in job_ids):
        return []
    for pattern in QUEUE_KEYS:
        for key in queue.redis.keys(pattern):
            raws = queue.redis.lrange(key, 0, -1)
            found = [job_id for raw in reversed(raws) for job_id in job_ids if job_id in raw]
            if sorted(found) == sorted(job_ids):
                return found
    return []


COLD_SIGNALS = {
    "sigquit": [signal.SIGQUIT],
    "sigterm-then-sigquit": [signal.SIGTERM, signal.SIGQUIT],
    "ctrl-c-twice": [signal.SIGINT, signal.SIGINT],
}


@pytest.mark.parametrize("how", list(COLD_SIGNALS))
def test_cold_shutdown_mid_job_requeues_it_and_the_next_worker_runs_it_once(
    cluster: Cluster, how: str
) -> None:
    """Cold shutdown (SIGQUIT; or SIGQUIT / a second Ctrl+C during a warm shutdown): the running
    job stops at its next step, records nothing (no FAILURE, no webhook, no manifest), its
    message goes straight back to the queue, ahead of a job that was waiting, and the worker
    exits at once; the next worker runs it to one SUCCESS, one manifest, one webhook."""
    cluster.ensure("fa")
    handle = cluster.queue.submit(Txt2ImgJob(webhook_url=f"http://{WEBHOOK_HOST}/in", **COLD))
    wait_until(lambda: mid_job(handle, at_least=0.05), 120, "job running")
    behind = cluster.queue.submit(Txt2ImgJob(**SHORT))  # one job slot: this one waits in Redis
    wait_until(lambda: queued_ids(cluster.queue, [behind.job_id]), 10, "the second job waiting")
    stopped = cluster.workers["fa"]
    assert stopped.proc is not None
    first, *more = COLD_SIGNALS[how]
    log_from = stopped.log_path.stat().st_size
    stopped.signal(first)
    signalled = time.monotonic()
    for sig in more:  # the warm shutdown is under way (the job still runs): now make it cold
        wait_until(lambda: "Warm shutdown" in new_log(stopped, log_from), 10, "the warm shutdown")
        stopped.signal(sig)
    stopped.proc.wait(COLD_EXIT_S)
    exited = time.monotonic() - signalled
    at = (handle.progress() or {}).get("fraction", 0)
    assert at < 0.9, f"premise: the job was stopped mid-way (progress {at})"
    assert manifest_keys(cluster.s3, handle.job_id) == {}, "stopped, not finished"
    assert cluster.queue.celery.AsyncResult(handle.job_id).state in {"STARTED", "PROGRESS"}, (
        "no outcome stored"
    )
    assert handle.state() == "running"
    assert queued_ids(cluster.queue, [handle.job_id, behind.job_id]) == [handle.job_id, behind.job_id], (
        "back in the queue, first in line"
    )
    assert lease_owner(cluster.queue, handle.job_id) is None, "the run lease was released"
    assert deliveries(cluster.queue, handle.job_id) == 0, "a shutdown is not a crash: the start is taken back"
    assert webhooks_queued(cluster.queue, handle.job_id) == []
    started = time.monotonic()
    nxt = cluster.ensure("fb")[0]
    result = handle.wait(timeout=240)
    done = time.monotonic() - started
    assert behind.wait(timeout=60).images
    wait_idle(cluster.queue)
    manifest = assert_committed_once(cluster.s3, handle.job_id, images=2)
    assert manifest["worker"]["pid"] == nxt.pid and len(result.images) == 2
    assert handle.state() == "succeeded"
    assert deliveries(cluster.queue, handle.job_id) == 1
    assert webhooks_queued(cluster.queue, handle.job_id) == ["succeeded"]
    log = new_log(stopped, log_from)
    step = re.search(r"reject requeue=True: the worker shut down at step (\d+/\d+)", log)
    assert step is not None, "the task handed its message back"
    assert "NotImplementedError" not in log and f"Task sdqueue.txt2img[{handle.job_id}] succeeded" not in log
    print(
        f"{how} at {at:.0%} of the job (stopped at step {step.group(1)}): worker exited {exited:.1f}s after "
        f"the signal, the job first in line again; the next worker (started then) ran it {done:.1f}s later: 1 manifest, 1 webhook"
    )


def test_two_workers_both_run_a_job_and_its_effects_happen_once(cluster: Cluster) -> None:
    """The worker running a job is paused (SIGSTOP) past the visibility timeout, so the other
    worker runs it too and commits it; the paused one resumes, finishes its own generation and
    meets the conditional writes: no object gets a second version, the manifest is the first."""
    workers = cluster.ensure("fa", "fb")
    hostnames = [w.hostname for w in workers]
    before = generations(cluster.queue, hostnames, after=time.time())
    handle = start_long_job(cluster, MEDIUM)
    owner = lease_owner(cluster.queue, handle.job_id)
    assert owner is not None
    paused = cluster.by_hostname(owner[0])
    other = next(w for w in workers if w is not paused)
    paused.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: deliveries(cluster.queue, handle.job_id) >= 2, 3 * VT + 30, "redelivery")
        first = assert_committed_once(cluster.s3, handle.job_id, images=1) if handle.wait(120) else None
    finally:
        paused.signal(signal.SIGCONT)
    assert first is not None and first["worker"]["pid"] == other.pid
    wait_until(
        lambda: generations(cluster.queue, hostnames, after=time.time()) - before >= 2,
        60,
        "the paused worker finishing its own generation",
        every=0.5,
    )
    wait_idle(cluster.queue)
    assert generations(cluster.queue, hostnames, after=time.time()) - before == 2, "both really generated"
    assert assert_committed_once(cluster.s3, handle.job_id, images=1) == first
    assert handle.state() == "succeeded"
    print("paused worker resumed after the other committed the job: 2 generations, every object written once")


# --- 2. a poison job -------------------------------------------------------------------------------


class OomKiller:
    """Plays the kernel's OOM killer for one job: SIGKILLs whichever worker starts it, then
    restarts that worker (as systemd/k8s would). No hook in the worker: the job is poison
    because every worker that runs it dies."""

    def __init__(self, cluster: Cluster, job_id: str) -> None:
        self.cluster = cluster
        self.job_id = job_id
        self.kills: list[float] = []
        self._seen: set[str] = set()

    def tick(self) -> None:
        owner = lease_owner(self.cluster.queue, self.job_id)
        if owner is None or owner[1] in self._seen:
            return
        self._seen.add(owner[1])
        victim = self.cluster.by_hostname(owner[0])
        victim.kill()
        self.kills.append(time.monotonic())
        victim.start(wait=False)


def test_poison_job_stops_after_max_deliveries(cluster: Cluster) -> None:
    cluster.ensure("fa", "fb")
    poison = cluster.queue.submit(Txt2ImgJob(**MEDIUM))
    behind = [cluster.queue.submit(Txt2ImgJob(**{**SHORT, "prompt": f"behind {i}"})) for i in range(3)]
    killer = OomKiller(cluster, poison.job_id)
    started = time.monotonic()
    wait_until(
        lambda: killer.tick() or poison.state() == "failed", 8 * VT + 120, "poison job failed", every=0.1
    )
    failed_after = time.monotonic() - started
    with pytest.raises(JobFailed) as failure:
        poison.result()
    assert len(killer.kills) == 3, killer.kills
    assert deliveries(cluster.queue, poison.job_id) == 4  # three runs and the refused fourth
    assert "started 3 times and its worker died each time" in failure.value.reason
    assert manifest_keys(cluster.s3, poison.job_id) == {}
    assert all(h.wait(timeout=120).images for h in behind)
    for process in cluster.workers.values():
        process.wait_ready()
    gaps = [b - a for a, b in zip([started] + killer.kills, killer.kills, strict=False)]
    print(
        f"poison job: killed its worker {len(killer.kills)} times (gaps {', '.join(f'{g:.1f}' for g in gaps)}s), "
        f"failed {failed_after:.1f}s after submit: {failure.value.reason[:80]}...; 3 jobs behind it done"
    )


# --- a call that never reaches a step: the watchdog, then the delivery cap -------------------------

STUCK = dict(prompt="stuck", width=2048, height=1024, steps=1)  # one step + a VAE decode of seconds


def test_a_stuck_call_exits_the_worker_and_the_delivery_cap_ends_the_job(
    logdir: Path,
    moto: MotoServer,
    s3,
    tiny_model: str,  # type: ignore[no-untyped-def]
) -> None:
    """No step callback for longer than time limit + grace (here 0.5 s + 1 s): the watchdog exits
    the process with 75; restarted (as systemd would), the worker refuses the redelivered message
    because max_deliveries (1 here) is used up, so a job that hangs every time cannot loop."""
    ensure_bucket(s3)
    settings = dict(
        visibility_timeout_s=5,
        output_bucket=BUCKET,
        job_time_limit_s=0.5,
        hard_limit_grace_s=1,
        max_deliveries=1,
    )
    with own_stack(logdir, moto.url, tiny_model, "stuck", **settings) as stack:
        worker = stack.worker
        assert worker is not None and worker.proc is not None
        handle = stack.queue.submit(Txt2ImgJob(**STUCK))
        code = worker.proc.wait(60)
        assert code == 75, f"exit code {code}:\n{worker.tail()}"
        assert "GPU call stuck for over 2s" in worker.tail(50)
        worker.start()
        with pytest.raises(JobFailed) as failure:
            handle.wait(timeout=60)
        assert "started 1 times and its worker died each time" in failure.value.reason, failure.value
        assert manifest_keys(s3, handle.job_id) == {}
        assert worker.alive()
    print(f"stuck call: watchdog exit 75; after a restart the cap failed it: {failure.value.reason[:70]}...")


# --- 3. Redis restart ------------------------------------------------------------------------------


def timed_submit(queue: SdQueue, **extra: Any) -> tuple[float, str]:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        queue.submit(Txt2ImgJob(**SHORT, **extra))
    return time.monotonic() - started, str(info.value)


def reconnected_at(worker: WorkerProcess, since_wall: float) -> float:
    """Wall time of the worker's first 'Connected to' log line after ``since_wall``."""
    for line in worker.log_path.read_text(errors="replace").splitlines():
        match = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): INFO/MainProcess\] Connected to", line)
        if match:
            stamp = (
                time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
            )
            if stamp >= since_wall:
                return stamp
    raise AssertionError(f"{worker.name} did not reconnect")


def test_redis_restart_mid_run_loses_nothing(cluster: Cluster) -> None:
    """Redis (AOF on) goes away for 6 s while both workers run jobs (so some finish while it is
    down) and more wait in the queue; nothing is lost, nothing is written twice, the workers
    reconnect by themselves, and a submit during the outage fails fast."""
    workers = cluster.ensure("fa", "fb")
    pids = [w.pid for w in workers]
    jobs = [
        cluster.queue.submit(Txt2ImgJob(**{**MEDIUM, "steps": 40, "prompt": f"r{i}"}), lane="bulk")
        for i in range(6)
    ]
    wait_until(lambda: mid_job(jobs[0]), 60, "first job running")
    cluster.redis.stop()
    down_at, down_wall = time.monotonic(), time.time()
    fail_publish, message = timed_submit(cluster.queue)
    fail_claim, _ = timed_submit(cluster.queue, job_id=f"down-{uuid.uuid4().hex[:6]}")
    time.sleep(max(0.0, 6 - (time.monotonic() - down_at)))
    restart_wall = time.time()
    cluster.redis.start()
    back = time.monotonic()
    outage = back - down_at
    new_job = wait_state(cluster.queue.submit(Txt2ImgJob(**SHORT)), {"succeeded", "failed"}, 120)
    new_job_s = time.monotonic() - back
    states = [wait_state(h, {"succeeded", "failed"}, 180) for h in jobs]
    wait_idle(cluster.queue)
    reconnect = [reconnected_at(w, down_wall) - restart_wall for w in workers]
    assert states == ["succeeded"] * len(jobs) and new_job == "succeeded", states
    assert [w.pid for w in workers] == pids and all(w.alive() for w in workers), "no worker restarted"
    for job in jobs:
        assert_committed_once(cluster.s3, job.job_id, images=1)
    assert max(fail_publish, fail_claim) < 10, (fail_publish, fail_claim)
    assert "Redis" in message and "unreachable" in message, message
    checked = assert_manifests_point_at_images(cluster.s3)
    print(
        f"Redis down {outage:.1f}s mid-run: submit failed fast ({fail_publish:.2f}s, {fail_claim:.2f}s with a "
        f"job id: {message[:60]}...); workers reconnected {', '.join(f'{r:.1f}' for r in reconnect)}s after "
        f"redis-server was started again, a new job done after {new_job_s:.1f}s; all {len(jobs)} jobs succeeded once, no worker "
        f"restarted; {checked} manifests complete"
    )


# --- the guarded stack: TLS + password Redis, a 2 s job time limit --------------------------------


class TlsRedisServer(RedisServer):
    """redis-server with TLS only (no plain port) and a password."""

    def __init__(self, logdir: Path, certs: Path, password: str) -> None:
        super().__init__(logdir, password=password)
        self.certs = certs

    @property
    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> TlsRedisServer:
        argv = [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(self.certs / "server.pem"),
            "--tls-key-file",
            str(self.certs / "server.key"),
            "--tls-ca-cert-file",
            str(self.certs / "ca.pem"),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            str(self.password),
            "--save",
            "",
            "--dir",
            str(self.datadir),
        ]
        self._spawn(argv)
        wait_for(lambda: port_open(self.port), 10, "redis-server (TLS)")
        return self


def make_certs(folder: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl command line)."""
    folder.mkdir(exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sdqueue-test-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
    )
    return folder


@dataclass
class Guarded:
    redis: TlsRedisServer
    worker: WorkerProcess
    env: dict[str, str]
    queue: SdQueue
    secrets: tuple[str, str]


REDIS_PASSWORD = f"pw-{uuid.uuid4().hex}"
S3_SECRET = f"s3secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def guarded(logdir: Path, moto: MotoServer, s3, tiny_model: str) -> Iterator[Guarded]:  # type: ignore[no-untyped-def]
    ensure_bucket(s3)
    certs = make_certs(logdir / "certs")
    server = TlsRedisServer(logdir, certs, REDIS_PASSWORD).start()
    env = worker_env(server.url, moto.url, tiny_model, job_time_limit_s=2)
    env.update(SSL_CERT_FILE=str(certs / "ca.pem"), AWS_SECRET_ACCESS_KEY=S3_SECRET)
    previous = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = env["SSL_CERT_FILE"]  # the test's own client trusts the test CA
    worker = WorkerProcess(logdir, env, name="guarded").start()
    try:
        yield Guarded(server, worker, env, SdQueue(settings_from(env)), (REDIS_PASSWORD, S3_SECRET))
    finally:
        worker.stop()
        server.stop()
        if previous is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = previous


def test_jobs_run_over_tls_with_a_redis_password(guarded: Guarded) -> None:
    port = guarded.redis.port
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"rediss://127.0.0.1:{port}/0").ping()
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        redis.Redis.from_url(f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0", socket_timeout=2).ping()
    started = time.monotonic()
    result = guarded.queue.submit(Txt2ImgJob(**SHORT)).wait(timeout=60)
    assert result.images
    print(
        f"rediss:// with a password: job done in {time.monotonic() - started:.1f}s; "
        "no password -> NOAUTH, plain redis:// -> refused"
    )


def test_a_client_without_the_ca_refuses_the_server_certificate(guarded: Guarded) -> None:
    """Certificates are verified: the same submit with the system CAs only (not the test CA)
    fails the TLS handshake instead of talking to an unverified server."""
    env = {k: v for k, v in guarded.env.items() if k != "SSL_CERT_FILE"}
    started = time.monotonic()
    refused = sdqueue_cli(env, "submit", "txt2img", "x", "--width", "64", "--height", "64", "--steps", "2")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert "certificate verify failed" in output.lower(), output[-2000:]
    app = make_celery(settings_from(env))  # and each connection on its own: broker, result backend
    os.environ.pop("SSL_CERT_FILE")
    try:
        for name, connect in (
            ("broker", lambda: app.connection_for_write().ensure_connection(max_retries=0)),
            ("result backend", lambda: app.backend.client.ping()),
        ):
            with pytest.raises((OperationalError, redis.ConnectionError)) as info:
                connect()
            assert "certificate verify failed" in str(info.value).lower(), (name, info.value)
    finally:
        os.environ["SSL_CERT_FILE"] = guarded.env["SSL_CERT_FILE"]
    print(f"no test CA: submit refused in {time.monotonic() - started:.1f}s: certificate verify failed")


def test_job_past_its_time_limit_is_stopped_and_the_worker_goes_on(guarded: Guarded) -> None:
    started = time.monotonic()
    handle = guarded.queue.submit(Txt2ImgJob(**{**MEDIUM, "steps": 150}))
    with pytest.raises(JobFailed) as failure:
        handle.wait(timeout=60)
    stopped_after = time.monotonic() - started
    progress = handle.progress() or {}
    assert "time limit" in failure.value.reason and failure.value.error_type == "GenerationError"
    assert progress.get("step", 150) < 150
    assert guarded.queue.submit(Txt2ImgJob(**SHORT)).wait(timeout=60).images
    print(
        f"time limit 2s: job stopped at step {progress.get('step')}/150, failed {stopped_after:.1f}s after "
        f"submit ({failure.value.reason}); next job served"
    )


def sdqueue_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdqueue.cli", *args],
        env=env,
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_secrets_are_never_logged_or_printed(guarded: Guarded) -> None:
    env = guarded.env
    done = sdqueue_cli(
        env,
        "submit",
        "txt2img",
        "a secret-free prompt",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--wait",
        "--timeout",
        "60",
    )
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["job_id"]
    status = sdqueue_cli(env, "status", job_id)
    down_url = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"
    refused = sdqueue_cli(
        {**env, "SDQ_REDIS_URL": down_url}, "submit", "txt2img", "x", "--width", "64", "--height", "64"
    )
    assert refused.returncode != 0 and ":***@" in refused.stderr, refused.stderr
    texts = {
        "worker log": guarded.worker.log_path.read_text(errors="replace"),
        "submit --wait": done.stdout + done.stderr,
        "status": status.stdout + status.stderr,
        "submit with Redis down": refused.stdout + refused.stderr,
    }
    for where, text in texts.items():
        for secret in guarded.secrets:
            assert secret not in text, f"a secret appears in the {where}"
    print(
        f"secrets: Redis password and S3 secret absent from the worker log ({len(texts['worker log'])} chars) "
        f"and from 3 CLI outputs; refused submit says: {refused.stderr.strip()[:100]}"
    )


# --- 8 on the GPU machine: a real CUDA out-of-memory ------------------------------------------------


@pytest.mark.gpu
def test_cuda_out_of_memory_is_survived(logdir: Path, moto: MotoServer, s3, tiny_model: str) -> None:  # type: ignore[no-untyped-def]
    """An oversized request (8 images of 2048x1024, the contract's maximum) runs out of GPU memory
    for real; the job fails alone with a clear reason and the worker serves the next job.

    Sizing: an empty 80 GB H100 might hold even that request (SDPA attention materialises no
    N x N matrix; the peak is activations: with SD 1.5 in fp16 the VAE decoder alone holds
    8 x 128 x 2048 x 1024 x 2 B = 4 GiB per full-size tensor, tens of GB in all). So the test
    plays a second tenant: once the worker is up it reserves all free memory but
    ``SDQ_GPU_TEST_HEADROOM_GB`` (default 1.5 GiB) with a tensor of its own. The oversized request
    needs far more than that with any SD model (the tiny model too: its VAE factor is 2, so its
    latents are 1024x512 and one UNet activation at batch 16 is 0.5 GiB), while a 512x512 image
    needs well under 1 GiB beyond the resident weights (SD 1.5 fp16: 2.1 GiB resident). The model
    is ``SDQ_GPU_TEST_MODEL`` (e.g. the random-weight SD 1.5 build of the benchmarks) or the tiny one.
    """
    import torch

    assert torch.cuda.is_available(), "run on the GPU machine"
    ensure_bucket(s3)
    server = RedisServer(logdir).start()
    env = worker_env(
        server.url, moto.url, os.environ.get("SDQ_GPU_TEST_MODEL", tiny_model), device="cuda", max_batch=8
    )
    worker = WorkerProcess(logdir, env, name="gpu-oom").start(timeout=900)
    queue = SdQueue(settings_from(env))
    ballast = None
    try:
        free, total = torch.cuda.mem_get_info()
        headroom = int(float(os.environ.get("SDQ_GPU_TEST_HEADROOM_GB", "1.5")) * 2**30)
        ballast = torch.empty((free - headroom) // 2**21 * 2**21, dtype=torch.uint8, device="cuda")
        started = time.monotonic()
        big = queue.submit(Txt2ImgJob(prompt="huge", width=2048, height=1024, num_images=8, steps=2))
        with pytest.raises(JobFailed) as failure:
            big.wait(timeout=900)
        failed_after = time.monotonic() - started
        started = time.monotonic()
        good = queue.submit(Txt2ImgJob(prompt="fits", width=512, height=512, steps=4)).wait(timeout=600)
        assert "out of GPU memory" in failure.value.reason, failure.value.reason
        assert good.images and worker.alive()
        print(
            f"CUDA OOM on {torch.cuda.get_device_name()} ({total / 2**30:.0f} GiB, {headroom / 2**30:.1f} GiB left "
            f"to the worker): failed in {failed_after:.1f}s ({failure.value.reason}); next 512x512 job "
            f"done in {time.monotonic() - started:.1f}s"
        )
    finally:
        del ballast
        worker.stop()
        server.stop()
