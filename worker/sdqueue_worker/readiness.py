"""The ready file of a worker process (GPU worker or notifier): created once it consumes, removed
at shutdown, so a readiness probe can test for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import signals


def keep_ready_file(path: str | None) -> None:
    """Create ``path`` when the Celery worker is ready and remove it when it shuts down."""
    if not path:
        return
    ready = Path(path)

    def mark_ready(**_: Any) -> None:
        ready.touch()

    def mark_not_ready(**_: Any) -> None:
        ready.unlink(missing_ok=True)

    signals.worker_ready.connect(mark_ready, weak=False)
    signals.worker_shutdown.connect(mark_not_ready, weak=False)
