"""Exponential backoff with jitter, for task retries and webhook retries alike."""

from __future__ import annotations

import random


def backoff_s(attempt: int, base: float, cap: float) -> float:
    """``base * 2**attempt`` seconds, capped at ``cap``, times a jitter of 0.5..1."""
    return min(cap, base * float(2**attempt)) * random.uniform(0.5, 1.0)
