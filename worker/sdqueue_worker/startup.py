"""Where a worker's start-up time goes: the phases from process start to serving, in seconds.

Recorded on the runtime (``Runtime.startup``), logged once the worker is ready and published in
its heartbeat (``sdq:worker:{hostname}``, key ``startup``), so an operator sees why a start was
slow (model load, attention probe, one compile per batch bucket) without a profiler.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere)."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return round(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return None


def note_age(phases: dict[str, float], name: str) -> None:
    """Record the process's age now as ``phases[name]`` (nothing where it cannot be read)."""
    age = process_age_s()
    if age is not None:
        phases[name] = age


@contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Record the seconds the ``with`` block took as ``phases[name]``."""
    began = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - began


def describe(phases: dict[str, float]) -> str:
    """One line: ``ready 60.8s after the process started: process 9.1, checks 0.2, load 5.0, ...``."""
    parts = [
        f"{name.removesuffix('_s')} {seconds:.1f}" for name, seconds in phases.items() if name != "ready_s"
    ]
    ready = phases.get("ready_s")
    head = f"ready {ready:.1f}s after the process started" if ready is not None else "ready"
    return f"{head}: " + ", ".join(parts)


def log_ready(phases: dict[str, float]) -> None:
    log.info("start-up %s", describe(phases))
