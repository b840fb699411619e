"""Redis-side guards around one delivery: poison cap, run lease, progress and cancel checks."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from sdqueue.errors import GenerationError
from sdqueue.names import cancel_key, deliveries_key, progress_key, run_lease_key

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


class StepSignals:
    """Progress and cancel for one job, without the GPU thread ever waiting on Redis.

    The GPU thread calls ``progress`` and ``cancelled`` every step: both only touch memory. A
    ``SignalPump`` thread writes the latest progress and reads the cancel key every
    ``interval_s``; ``close`` (on the job's own thread) writes the final progress.
    """

    def __init__(self, client: redis.Redis, job_id: str, publish=None) -> None:  # type: ignore[no-untyped-def]
        self.client = client
        self.job_id = job_id
        self.publish = publish
        self._pending: dict[str, float] | None = None
        self._cancelled = False
        self._closed = False
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()

    def progress(self, step: int, total: int) -> None:
        body = {"step": step, "total": total, "fraction": round(step / max(total, 1), 4), "at": time.time()}
        with self._lock:
            self._pending = body

    def cancelled(self) -> bool:
        return self._cancelled

    def flush(self, final: bool = False) -> None:
        """Write pending progress and refresh the cancel flag (best effort: Redis may be down).

        Writes happen under the lock and never after the final flush: a PROGRESS state written
        late would overwrite the job's SUCCESS in the result backend.
        """
        with self._io_lock:
            if self._closed:
                return
            self._closed = final
            with self._lock:
                body, self._pending = self._pending, None
            self._write(body)

    def _write(self, body: dict[str, float] | None) -> None:
        try:
            self._cancelled = self._cancelled or bool(self.client.exists(cancel_key(self.job_id)))
            if body is not None:
                self.client.set(progress_key(self.job_id), json.dumps(body), ex=DAY)
                if self.publish:
                    self.publish(body)
        except redis.RedisError:
            pass  # progress is best effort; the job goes on


class SignalPump:
    """One thread per worker flushing the StepSignals of the running jobs."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = max(interval_s, 0.01)
        self._jobs: dict[str, StepSignals] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="sdq-signals", daemon=True).start()

    def open(self, signals: StepSignals) -> StepSignals:
        with self._lock:
            self._jobs[signals.job_id] = signals
        return signals

    def close(self, signals: StepSignals) -> None:
        with self._lock:
            self._jobs.pop(signals.job_id, None)
        signals.flush(final=True)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            with self._lock:
                running = list(self._jobs.values())
            for signals in running:
                signals.flush()
