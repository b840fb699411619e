"""The worker's Celery app: ``celery -A sdqueue_worker.app worker`` (``sdqueue worker`` adds the flags).

Pool: ``threads``. The GPU is owned by one thread (sdqueue_worker.executor) that runs one pipeline call
at a time; Celery's concurrency is the number of job slots feeding it (1 when micro-batching is
off, 2 x max_batch when on, so one batch can be prepared and uploaded while another runs).
Why not prefork: each child would load its own model copy (VRAM x N) and batching across
children is impossible; why not solo: it blocks the event loop during a job, so no heartbeats,
remote control, lease renewal or Flower status while busy. The threads pool has no Celery time
limits, so the GPU thread enforces the job time limit at every denoising step and a watchdog
exits the process if a call hangs (see docs/reliability.md).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals

from sdqueue.celeryconfig import make_celery
from sdqueue.errors import StartupError
from sdqueue_worker import logs
from sdqueue_worker.backend import backend_url
from sdqueue_worker.lease import LeaseKeeper
from sdqueue_worker.metrics import start_metrics
from sdqueue_worker.readiness import keep_ready_file
from sdqueue_worker.settings import get_worker_settings
from sdqueue_worker.startup import log_ready
from sdqueue_worker.state import get_state, start_state

log = logging.getLogger(__name__)
settings = get_worker_settings()
app = make_celery(settings, "sdqueue-worker", include=["sdqueue_worker.tasks", "sdqueue_worker.notify"])
app.steps["consumer"].add(LeaseKeeper)
logs.install(settings.log_format, settings.model)
app.Task.Strategy = "sdqueue_worker.strategy:guarded"  # a malformed message must not stop the worker
app.conf.worker_consumer = "sdqueue_worker.consumer:Consumer"  # every message gets a final result
app.Task.Request = "sdqueue_worker.consumer:JobRequest"  # a cold shutdown's jobs go back first in line
app.conf.worker_pool = "sdqueue_worker.pool:TaskPool"  # threads, with revoke(terminate=True) honoured
# Failed results without server tracebacks, capped; OOM answers from Redis retried (backend.py).
app.conf.result_backend = backend_url(settings.redis_url.get_secret_value())
# A result stored while Redis restarts: 10 jittered tries, waits from 0.2 s doubling to a 10 s cap
# (about 25 s in all on average, at most 53 s) instead of the default 10 ms start (about 5 s),
# after which a finished job would be reported failed. Worker only: producers should fail fast.
app.conf.result_backend_base_sleep_between_retries_ms = 100
# Redis full ("OOM command not allowed") or down for longer: keep trying about 2.5 minutes on
# average (30 tries, 10 s cap) so a finished job's result lands once memory is free again.
app.conf.result_backend_max_retries = 30


@signals.worker_init.connect
def _load_model(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or "worker"
    try:
        state = start_state(settings, hostname, app)
    except StartupError as exc:
        log.error("the worker cannot start: %s", exc)
        sys.exit(1)
    except Exception:
        log.exception("model load failed; the worker stops (fix the model setting: %s)", settings.model)
        sys.exit(1)
    if settings.metrics_port:
        try:
            start_metrics(state)
        except OSError:
            log.exception("cannot serve metrics on port %s; the worker stops", settings.metrics_port)
            sys.exit(1)


@signals.worker_ready.connect
def _log_startup(**_: Any) -> None:
    log_ready(get_state().runtime.startup)  # Celery's logging is set up by now, not at worker_init


keep_ready_file(settings.ready_file)
