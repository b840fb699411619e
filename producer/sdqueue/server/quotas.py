"""Per-key fairness in Redis, each check one atomic Lua script: a token-bucket rate limit and a cap
on jobs queued or running at once. Any number of server processes share the same counters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from sdqueue.names import KEY_PREFIX, cancel_key

# Token bucket. KEYS[1] the bucket hash; ARGV[1] refill per ms, ARGV[2] burst.
# Returns {allowed, ms until one token}.
_RATE_BODY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate)
local allowed = 0
if tokens >= 1 then tokens = tokens - 1; allowed = 1 end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
if allowed == 0 then return {0, math.ceil((1 - tokens) / rate)} end
"""

# Concurrency cap. KEYS[2] the tenant's in-flight zset; ARGV[3] job id, ARGV[4] limit, ARGV[5] now (s),
# ARGV[6] max age (s), ARGV[7] cancel key prefix. Finished jobs are pruned only when the cap is
# reached, so a submit under the cap is O(log n). The result keys are Celery's
# (celery-task-meta-<id>): read here, never written. Returns {1, 0} admitted or {2, 0} over the cap.
_ACQUIRE_BODY = """
local set, id, limit, now, age = KEYS[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('ZSCORE', set, id) then return {1, 0} end
if redis.call('ZCARD', set) >= limit then
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
return {1, 0}
"""

# One round trip per submit: the rate limit (ARGV[8] == '1': charge a token), then the cap.
_ADMIT = "if ARGV[8] == '1' then " + _RATE_BODY + " end " + _ACQUIRE_BODY
_RATE = _RATE_BODY + " return {1, 0}"


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused and when to come back."""

    message: str
    retry_after_s: int


def active_key(tenant: str) -> str:
    return f"{KEY_PREFIX}tenant:{tenant}:active"


def rate_key(tenant: str) -> str:
    return f"{KEY_PREFIX}tenant:{tenant}:rate"


class Quotas:
    """The two checks, against one Redis."""

    def __init__(self, client: redis.Redis, max_age_s: int) -> None:
        self.client = client
        self.max_age_s = max_age_s
        self._rate = client.register_script(_RATE)
        self._admit = client.register_script(_ADMIT)

    @staticmethod
    def _rate_refusal(per_minute: int, burst: int, wait_ms: int) -> Refusal:
        return Refusal(
            f"rate limit: this key may submit {per_minute} requests a minute (bursts of {burst}); "
            "retry after the Retry-After seconds",
            max(1, math.ceil(int(wait_ms) / 1000)),
        )

    def take_token(self, tenant: str, per_minute: int, burst: int) -> Refusal | None:
        allowed, wait_ms = self._rate(keys=[rate_key(tenant)], args=[per_minute / 60000, burst])
        return None if allowed else self._rate_refusal(per_minute, burst, wait_ms)

    def admit(
        self, tenant: str, job_id: str, limit: int, now: float, rate: tuple[int, int] | None
    ) -> Refusal | None:
        """Charge a token (``rate`` = per minute, burst; None: no charge) and count ``job_id`` against
        the tenant's cap (idempotent: a counted job counts once), in one script."""
        per_minute, burst = rate or (1, 1)
        args: list[str | int | float] = [
            per_minute / 60000,
            burst,
            job_id,
            limit,
            int(now),
            self.max_age_s,
            cancel_key(""),
            int(bool(rate)),
        ]
        verdict, wait_ms = self._admit(keys=[rate_key(tenant), active_key(tenant)], args=args)
        if verdict == 1:
            return None
        if verdict == 0:
            return self._rate_refusal(per_minute, burst, wait_ms)
        return Refusal(
            f"concurrency quota: this key may have {limit} jobs queued or running at once; "
            "wait for one to finish or cancel one",
            5,
        )

    def release(self, tenant: str, job_id: str) -> None:
        self.client.zrem(active_key(tenant), job_id)
