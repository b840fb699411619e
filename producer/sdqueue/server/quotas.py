"""Per-key fairness in Redis: a token-bucket rate limit (uploads here; submits charge it inside the
submit script of ``sdqueue.server.publish``, with the cap on jobs queued or running at once). Any
number of server processes share the same counters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from sdqueue.names import KEY_PREFIX

TAKE_TOKEN_LUA = """
local function take_token(bucket, rate, burst)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local state = redis.call('HMGET', bucket, 'tokens', 'at')
  local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
  tokens = math.min(burst, tokens + (now - at) * rate)
  local wait = 0
  if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / rate) end
  redis.call('HSET', bucket, 'tokens', tokens, 'at', now)
  redis.call('PEXPIRE', bucket, math.ceil(burst / rate) + 1000)
  return wait
end
"""
"""The token bucket, as a Lua function for scripts that charge it (this module's and the submit
script of ``sdqueue.server.publish``): refills ``rate`` tokens per ms up to ``burst``, takes one if
it can; returns 0, or the ms until one token is there."""

# KEYS[1] the bucket hash; ARGV[1] refill per ms, ARGV[2] burst. Returns {allowed, ms until one token}.
_RATE = (
    TAKE_TOKEN_LUA
    + """
local wait = take_token(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait > 0 then return {0, wait} end
return {1, 0}
"""
)


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

    def release(self, tenant: str, job_id: str) -> None:
        self.client.zrem(active_key(tenant), job_id)
