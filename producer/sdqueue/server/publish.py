"""The server's submit: claim, rate limit, quota and enqueue in one atomic Redis script, on asyncio.

The message is Celery's own (``app.amqp.create_task_message``: protocol 2 headers and body), wrapped
in the envelope kombu's Redis transport writes, and LPUSHed to the lane's list, exactly where
``SdQueue.submit`` puts it (``tests/integration/test_server.py`` compares the two). Doing it here
instead of through kombu saves a thread hop and two round trips per submit, and makes the quota and
the enqueue one step: a job is either counted and queued, or neither. Celery's
``before/after_task_publish`` signals do not fire for these submits.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import redis
import redis.asyncio

from sdqueue.client import Job, job_record, record_ttl_s, task_message
from sdqueue.contract import spec_fingerprint
from sdqueue.errors import BrokerUnavailable, JobIdConflict
from sdqueue.names import cancel_key, job_claim_key, lane_queue
from sdqueue.server.quotas import TAKE_TOKEN_LUA, Refusal, active_key, rate_key
from sdqueue.settings import Settings

# KEYS: rate bucket, in-flight zset, claim, lane list.
# ARGV: 1 refill per ms, 2 burst, 3 job id, 4 limit, 5 now (s), 6 max age (s), 7 cancel prefix,
#       8 charge ('1'), 9 claim JSON, 10 fingerprint, 11 claim TTL (s), 12 message.
# Returns {1, 0} queued, {0, ms} rate limited, {2, 0} over the cap, {3, 0} id used for another
# spec, {4, 0} this exact job was already submitted (nothing new).
_SUBMIT = (
    TAKE_TOKEN_LUA
    + """
local existing = redis.call('GET', KEYS[3])
if existing then
  local ok, prior = pcall(cjson.decode, existing)
  if ok and type(prior) == 'table' and prior['fingerprint'] and prior['fingerprint'] ~= ARGV[10] then
    return {3, 0}
  end
  return {4, 0}
end
if ARGV[8] == '1' then
  local wait = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
  if wait > 0 then return {0, wait} end
end
local set, id, limit, now, age = KEYS[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if not redis.call('ZSCORE', set, id) and redis.call('ZCARD', set) >= limit then
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now - age)
  for _, member in ipairs(redis.call('ZRANGE', set, 0, -1)) do
    local meta = redis.call('GET', 'celery-task-meta-' .. member)
    local done = redis.call('EXISTS', ARGV[7] .. member) == 1
    if meta and not done then
      local status = cjson.decode(meta)['status']
      done = status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED'
    end
    if done then redis.call('ZREM', set, member) end
  end
  if redis.call('ZCARD', set) >= limit then return {2, 0} end
end
redis.call('ZADD', set, now, id)
redis.call('EXPIRE', set, age)
redis.call('SET', KEYS[3], ARGV[9], 'EX', tonumber(ARGV[11]))
redis.call('LPUSH', KEYS[4], ARGV[12])
return {1, 0}
"""
)


def envelope(app: Any, job_id: str, spec: Job, queue_name: str) -> str:
    """The Redis list entry kombu would write for this job (see the module docstring)."""
    headers, properties, body, _ = task_message(app, job_id, spec, sent_event=False)
    headers["sdq_submitted_at"] = time.time()
    message = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue_name},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message)


class Submitter:
    """Submits validated specs for one server process (one asyncio Redis pool, made on first use)."""

    def __init__(self, celery: Any, settings: Settings, max_age_s: int) -> None:
        self.celery = celery
        self.settings = settings
        self.max_age_s = max_age_s
        self._script: Any = None
        self._loop: Any = None

    def _ensure(self) -> Any:
        """The script on a client of the running event loop (an asyncio pool belongs to one loop)."""
        loop = asyncio.get_running_loop()
        if self._script is None or self._loop is not loop:
            self._loop = loop
            client = redis.asyncio.Redis.from_url(
                self.settings.redis_url.get_secret_value(),
                socket_timeout=self.settings.redis_socket_timeout_s,
                socket_connect_timeout=self.settings.redis_connect_timeout_s,
            )
            self._script = client.register_script(_SUBMIT)
        return self._script

    async def submit(
        self, tenant: str, spec: Job, job_id: str, lane: str, limit: int, rate: tuple[int, int] | None
    ) -> Refusal | bool:
        """True: queued now; False: this exact job was already submitted; a Refusal says why not.
        Raises JobIdConflict or BrokerUnavailable."""
        per_minute, burst = rate or (1, 1)
        fingerprint = spec_fingerprint(spec)
        now = time.time()
        args: list[str | int | float] = [
            per_minute / 60000, burst, job_id, limit, int(now), self.max_age_s, cancel_key(""),
            int(bool(rate)), job_record(spec, fingerprint), fingerprint,
            record_ttl_s(spec, self.settings), envelope(self.celery, job_id, spec, lane_queue(lane, spec.model)),
        ]  # fmt: skip
        keys = [rate_key(tenant), active_key(tenant), job_claim_key(job_id), lane_queue(lane, spec.model)]
        try:
            verdict, wait_ms = await self._ensure()(keys=keys, args=args)
        except (redis.RedisError, OSError) as exc:
            raise BrokerUnavailable(f"could not enqueue job {job_id}: Redis unreachable ({exc})") from None
        if verdict in (1, 4):
            return bool(verdict == 1)
        if verdict == 3:
            raise JobIdConflict(f"job id {job_id!r} was already used for a different job; pick a new id")
        if verdict == 0:
            return Refusal(
                f"rate limit: this key may submit {per_minute} requests a minute (bursts of {burst}); "
                "retry after the Retry-After seconds",
                max(1, -(-int(wait_ms) // 1000)),
            )
        return Refusal(
            f"concurrency quota: this key may have {limit} jobs queued or running at once; "
            "wait for one to finish or cancel one",
            5,
        )
