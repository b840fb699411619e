"""Per-key fairness in Redis: a token-bucket rate limit (uploads here; submits charge it inside the
submit script of ``sdqueue.server.publish``, with the cap on jobs queued or running at once). Any
number of server processes share the same counters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from sdqueue.names import KEY_PREFIX

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
