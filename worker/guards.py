"""Redis-side guards around one delivery: poison cap, run lease, progress and cancel checks."""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import redis

from producer.errors import GenerationError
from producer.names import cancel_key, deliveries_key, progress_key, run_lease_key

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
            "or hard time limit); it is not run again. Check its size and steps.")
    return count


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
            pass                  # failing here would turn a finished job into a failed one


def renew_lease(client: redis.Redis, job_id: str, token: str, ttl_ms: int) -> bool:
    return bool(client.eval(_RENEW, 1, run_lease_key(job_id), token, ttl_ms))


class StepSignals:
    """Throttled progress writes and cancel checks, called from the GPU thread every step."""

    def __init__(self, client: redis.Redis, job_id: str, interval_s: float, publish=None) -> None:  # type: ignore[no-untyped-def]
        self.client = client
        self.job_id = job_id
        self.interval_s = interval_s
        self.publish = publish
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False

    def progress(self, step: int, total: int) -> None:
        now = time.monotonic()
        if step < total and now - self._last_progress < self.interval_s:
            return
        self._last_progress = now
        body = {"step": step, "total": total, "fraction": round(step / max(total, 1), 4), "at": time.time()}
        try:
            self.client.set(progress_key(self.job_id), json.dumps(body), ex=DAY)
            if self.publish:
                self.publish(body)
        except redis.RedisError:
            pass  # progress is best effort; the job goes on

    def cancelled(self) -> bool:
        now = time.monotonic()
        if self._cancelled or now - self._last_cancel_check < self.interval_s:
            return self._cancelled
        self._last_cancel_check = now
        try:
            self._cancelled = bool(self.client.exists(cancel_key(self.job_id)))
        except redis.RedisError:
            pass
        return self._cancelled
