"""Redis-side guards around one delivery: the poison cap and the run lease.

Progress and cancel checks are in sdqueue_worker.progress.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from sdqueue.errors import GenerationError
from sdqueue.names import deliveries_key, run_lease_key

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
DAY = 24 * 3600


def count_delivery(client: redis.Redis, job_id: str, attempt: int, max_deliveries: int) -> int:
    """Count this start of a message; refuse a message that has killed its worker too often."""
    key = deliveries_key(job_id, attempt)
    pipe = client.pipeline()
    pipe.incr(key)
    pipe.expire(key, DAY)
    count = int(pipe.execute()[0])
    if count > max_deliveries:
        raise GenerationError(
            f"this job was started {count - 1} times and its worker died each time (crash, out of memory "
            "or hard time limit); it is not run again. Check its size and steps."
        )
    return count


def uncount_delivery(client: redis.Redis, job_id: str, attempt: int) -> None:
    """Take back a start that ended with the worker's cold shutdown: the worker did not die of
    the job, so a restart must not bring the job closer to the poison cap."""
    try:
        client.decr(deliveries_key(job_id, attempt))
    except redis.RedisError:  # the count stays one high: at worst one start fewer before the cap
        pass


@contextmanager
def run_lease(client: redis.Redis, job_id: str, ttl_ms: int, owner: str) -> Iterator[str | None]:
    """Hold ``running:{job_id}`` while the job runs; yields None when another worker holds it."""
    token = f"{owner}:{uuid.uuid4().hex}"
    if not client.set(run_lease_key(job_id), token, nx=True, px=ttl_ms):
        yield None
        return
    try:
        yield token
    finally:
        try:
            client.eval(_RELEASE, 1, run_lease_key(job_id), token)
        except redis.RedisError:  # Redis down as the job ends: the lease expires by itself (TTL);
            pass  # failing here would turn a finished job into a failed one


def renew_lease(client: redis.Redis, job_id: str, token: str, ttl_ms: int) -> bool:
    return bool(client.eval(_RENEW, 1, run_lease_key(job_id), token, ttl_ms))
