"""Redis high availability with Sentinel: a real master (AOF on), a replica and three sentinels on
loopback; the worker and the client use ``sentinel://`` URLs. The master is killed (SIGKILL) with
jobs queued and one running; the sentinels promote the replica and every job completes, once."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from devstack.services import MotoServer, RedisServer, SentinelServer, WorkerProcess, stack_env, wait_for
from sdqueue import SdQueue, Txt2ImgJob
from tests.helpers import settings_from

pytestmark = pytest.mark.faults
MASTER = "mymaster"
JOBS = 6


def sentinel_master_port(sentinel: SentinelServer) -> int | None:
    try:
        answer = redis.Redis(port=sentinel.port, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER)
    except redis.RedisError:
        return None
    return int(answer[1]) if answer else None


def sentinels_ready(sentinels: list[SentinelServer]) -> bool:
    """Each sentinel knows the replica and the two other sentinels (else no failover can happen)."""
    for sentinel in sentinels:
        client = redis.Redis(port=sentinel.port, socket_timeout=1)
        try:
            if not client.sentinel_slaves(MASTER) or len(client.sentinel_sentinels(MASTER)) < 2:
                return False
        except redis.RedisError:
            return False
    return True


def test_every_job_completes_once_across_a_master_failover(
    logdir: Path, moto: MotoServer, s3: Any, tiny_model: str
) -> None:
    started: list[Any] = []
    try:
        master = RedisServer(logdir, appendonly=True).start()
        started.append(master)
        replica = RedisServer(logdir, appendonly=True, replica_of=master.port).start()
        started.append(replica)
        replica_client = redis.Redis(port=replica.port, socket_timeout=2)
        wait_for(
            lambda: replica_client.info("replication").get("master_link_status") == "up", 30, "replica sync"
        )
        sentinels = [SentinelServer(logdir, master.port, MASTER).start() for _ in range(3)]
        started += sentinels
        wait_for(lambda: sentinels_ready(sentinels), 30, "sentinels discovering each other")
        url = ";".join(f"{s.url}/0" for s in sentinels)
        env = stack_env(url, moto.url, tiny_model, redis_sentinel_master=MASTER, visibility_timeout_s=5)
        worker = WorkerProcess(logdir, env, name="sentinel").start()
        started.append(worker)
        queue = SdQueue(settings_from(env))
        handles = [
            queue.submit(Txt2ImgJob(prompt=f"ha {i}", width=64, height=64, steps=40, seed=i))
            for i in range(JOBS)
        ]
        wait_for(lambda: bool(handles[0].progress()), 60, "the first job running")
        redis.Redis(port=master.port).wait(1, 2000)  # what the client wrote has reached the replica
        states = [h.state() for h in handles]
        master.kill()
        killed = time.monotonic()
        wait_for(lambda: all(sentinel_master_port(s) == replica.port for s in sentinels), 60, "failover")
        promoted_s = time.monotonic() - killed
        finished = []
        for handle in handles:
            result = handle.wait(timeout=120)
            finished.append(time.monotonic() - killed)
            assert result.job_id == handle.job_id and len(result.images) == 1
        print(
            f"states at the kill: {states}; replica promoted after {promoted_s:.1f}s; "
            f"jobs done at {[round(t, 1) for t in finished]}s after the kill"
        )
        log = worker.log_path.read_text(errors="replace")
        for handle in handles:
            runs = re.findall(rf"Task sdqueue\.txt2img\[{handle.job_id}\] succeeded", log)
            assert len(runs) == 1, f"{handle.job_id} succeeded {len(runs)} times"
        assert "running" in states and "queued" in states
    finally:
        for service in reversed(started):
            service.kill() if isinstance(service, (RedisServer, SentinelServer)) else service.stop()
