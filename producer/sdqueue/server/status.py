"""A job's state as the API shows it: progress, queue position, a rough ETA, result URLs."""

from __future__ import annotations

import json
from typing import Any

import redis

from sdqueue.client import SdQueue
from sdqueue.errors import JobFailed
from sdqueue.names import BULK_QUEUE, INTERACTIVE_QUEUE, KEY_PREFIX
from sdqueue.server.schemas import ImageOut, JobStatus, Progress, QueueInfo, ResultOut

TERMINAL = ("succeeded", "failed", "cancelled")
LANES_IN_ORDER = (INTERACTIVE_QUEUE, BULK_QUEUE)  # the worker empties interactive first
EWMA_KEY = f"{KEY_PREFIX}server:job_seconds"

# KEYS: the lane lists in the order workers take them; ARGV: '"<job id>"', scan cap.
# kombu LPUSHes and workers BRPOP: the oldest message is at the tail.
_POSITION = """
local ahead, cap = 0, tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  local len = redis.call('LLEN', key)
  local n = math.min(len, cap)
  if n > 0 then
    local items = redis.call('LRANGE', key, -n, -1)
    for i = #items, 1, -1 do
      if string.find(items[i], ARGV[1], 1, true) then return {1, ahead + (#items - i), 0} end
    end
  end
  if len > n then return {0, ahead + len, 1} end
  ahead = ahead + len
end
return {0, ahead, 0}
"""

# KEYS: the job's seen-marker, the EWMA key; ARGV: seconds. Each finished job counts once.
_OBSERVE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then
  local old = tonumber(redis.call('GET', KEYS[2]))
  local new = tonumber(ARGV[1])
  if old then new = old * 0.8 + new * 0.2 end
  redis.call('SET', KEYS[2], new)
end
return 1
"""


def state_name(state: Any) -> str:
    """``JobHandle.state()`` as a plain string (an enum's value, or the string itself)."""
    return str(getattr(state, "value", state))


class StatusReader:
    """Reads everything ``GET /v1/jobs/{id}`` shows."""

    def __init__(self, queue: SdQueue, scan_limit: int) -> None:
        self.queue = queue
        self.scan_limit = scan_limit
        self._position = queue.redis.register_script(_POSITION)
        self._observe = queue.redis.register_script(_OBSERVE)

    def queue_info(self, job_id: str) -> QueueInfo:
        found, ahead, deeper = self._position(
            keys=list(LANES_IN_ORDER), args=[f'"{job_id}"', self.scan_limit]
        )
        position: int | None = int(ahead) if found else (None if deeper else 0)
        waiting = sum(int(self.queue.redis.llen(key)) for key in LANES_IN_ORDER)
        return QueueInfo(position=position, waiting=waiting)

    def mean_job_s(self) -> float | None:
        value = self.queue.redis.get(EWMA_KEY)
        return float(value) if value else None

    def observe(self, job_id: str, seconds: float) -> None:
        try:
            self._observe(keys=[f"{KEY_PREFIX}server:seen:{job_id}", EWMA_KEY], args=[seconds])
        except redis.RedisError:
            pass  # the ETA is an estimate; never fail a status read over it

    def light(self, job_id: str) -> tuple[str, dict[str, Any] | None]:
        handle = self.queue.handle(job_id)
        return state_name(handle.state()), handle.progress()

    def read(self, job_id: str, with_queue: bool = True) -> JobStatus:
        state, progress = self.light(job_id)
        status = JobStatus(job_id=job_id, state=state, progress=Progress(**progress) if progress else None)  # type: ignore[arg-type]
        if state in TERMINAL:
            return self._finished(status)
        mean = self.mean_job_s()
        if state == "queued" and with_queue:
            status.queue = self.queue_info(job_id)
            if mean is not None and status.queue.position is not None:
                status.eta_s = round((status.queue.position + 1) * mean, 2)
        elif state in ("running", "retrying") and mean is not None:
            done = status.progress.fraction if status.progress else 0.0
            status.eta_s = round(max(0.0, 1.0 - done) * mean, 2)
        return status

    def _finished(self, status: JobStatus) -> JobStatus:
        handle = self.queue.handle(status.job_id)
        try:
            result = handle.result()
        except JobFailed as exc:
            status.error, status.error_type = exc.reason, exc.error_type or None
            return status
        if result is None:
            return status
        urls = self.queue.presigned_urls(result)
        status.result = ResultOut(
            images=[
                ImageOut(index=i.index, seed=i.seed, url=i.url, http_url=u, width=i.width, height=i.height)
                for i, u in zip(result.images, urls, strict=False)
            ],
            manifest_url=result.manifest_url,
            timings={k: float(v) for k, v in result.timings.items() if isinstance(v, (int, float))},
            model_id=result.model_id,
        )
        total = result.timings.get("total_s")
        if isinstance(total, (int, float)):
            self.observe(status.job_id, float(total))
        return status


def sse(event: str, body: Any) -> str:
    """One Server-Sent Event."""
    data = body.model_dump_json() if hasattr(body, "model_dump_json") else json.dumps(body)
    return f"event: {event}\ndata: {data}\n\n"
