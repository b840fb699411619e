"""One single-concurrency worker per GPU on this host: ``sdqueue worker --gpus all|0,1``.

The parent never imports torch nor touches CUDA: it counts GPUs with ``nvidia-smi -L`` and
starts one ``celery worker`` child per GPU with ``CUDA_VISIBLE_DEVICES`` set to that GPU, a
distinct node name and, when configured, distinct heartbeat/ready files and metrics ports.
It forwards SIGTERM, SIGINT and SIGQUIT to every child, once per signal received: SIGTERM is
Celery's warm shutdown (the jobs finish), SIGQUIT or a second SIGINT its cold one (the running
jobs go back to the queue; a second SIGTERM is only another warm one). It restarts a child that
dies unexpectedly with exponential backoff, gives up (stops the others and exits 1) after
``MAX_QUICK_FAILURES`` short-lived runs in a row, and exits when all children have exited after
a stop signal. A child that exits 0 by itself (a
remote ``shutdown`` command) is not restarted.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from sdqueue.errors import LauncherError

log = logging.getLogger("sdqueue.launcher")

QUICK_FAILURE_S = 60.0
"""A child that dies sooner than this after its start counts as a quick failure."""
MAX_QUICK_FAILURES = 5
BACKOFF_MAX_S = 30.0
POLL_S = 0.2
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
"""Stop signals the launcher passes on to its children (Celery's warm and cold shutdowns)."""


def parse_gpus(gpus: str, environ: dict[str, str] | None = None) -> list[str]:
    """``"all"`` -> the GPUs this process may use; ``"0,1"`` -> ``["0", "1"]``."""
    if gpus.strip().lower() != "all":
        ids = [item.strip() for item in gpus.split(",") if item.strip()]
        if not ids or len(set(ids)) != len(ids):
            raise LauncherError(f"--gpus {gpus!r}: give 'all' or distinct GPU ids such as 0,1")
        return ids
    visible = (environ if environ is not None else dict(os.environ)).get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:  # the parent is already restricted: honour it (nvidia-smi ignores this variable)
        return [item.strip() for item in visible.split(",") if item.strip()]
    return gpus_from_nvidia_smi()


def gpus_from_nvidia_smi() -> list[str]:
    """GPU indices listed by ``nvidia-smi -L`` (lines ``GPU 0: NVIDIA H100 ... (UUID: ...)``)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise LauncherError(
            f"--gpus all: cannot list GPUs with nvidia-smi ({exc}); pass ids, e.g. --gpus 0,1"
        ) from None
    ids = [line.split(":", 1)[0].split()[1] for line in out.splitlines() if line.startswith("GPU ")]
    if not ids:
        raise LauncherError("--gpus all: nvidia-smi lists no GPU")
    return ids


def child_name(name: str | None, gpu: str) -> str:
    """Celery node name of the child for ``gpu``: ``gpu0@%h``, or ``name-gpu0@host`` from ``name``."""
    if not name:
        return f"gpu{gpu}@%h"
    node, _, host = name.partition("@")
    return f"{node}-gpu{gpu}@{host or '%h'}"


def child_env(environ: dict[str, str], gpu: str, index: int) -> dict[str, str]:
    """The parent's environment plus this child's GPU, files and metrics port.

    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes CUDA number GPUs as nvidia-smi does (CUDA's default
    order puts the fastest first), so worker ``gpuN`` runs on the GPU nvidia-smi calls N.
    """
    env = dict(environ)
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env["CUDA_VISIBLE_DEVICES"] = gpu
    for key in ("SDQ_HEARTBEAT_FILE", "SDQ_READY_FILE"):
        if env.get(key):
            env[key] = f"{env[key]}.gpu{gpu}"
    if env.get("SDQ_METRICS_PORT"):
        env["SDQ_METRICS_PORT"] = str(int(env["SDQ_METRICS_PORT"]) + index)
    return env


@dataclass
class Child:
    """One worker process bound to one GPU."""

    gpu: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None
    done: bool = False
    signalled: bool = False
    stale_files: list[Path] = field(default_factory=list)

    def start(self) -> None:
        for path in self.stale_files:  # a dead child's ready/heartbeat files must not look alive
            path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        self.started_at = time.monotonic()
        self.restart_at = None
        self.signalled = False
        log.info("started worker for GPU %s (pid %d)", self.gpu, self.proc.pid)

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
            self.signalled = True


class Launcher:
    """Supervises the children; ``run()`` returns the exit code."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.stopping = False
        self.gave_up = False

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: forwarding to %d worker(s)", signal.Signals(signum).name, len(self.children))
        self.stopping = True
        for child in self.children:
            child.signal(signum)

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in FORWARDED}
        try:
            for child in self.children:
                child.start()
            while not all(child.done for child in self.children):
                for child in self.children:
                    self._check(child)
                time.sleep(POLL_S)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 1 if self.gave_up else 0

    def _check(self, child: Child) -> None:
        if child.done:
            return
        if child.restart_at is not None:
            if self.stopping:
                child.done = True
            elif time.monotonic() >= child.restart_at:
                child.start()
            return
        assert child.proc is not None
        code = child.proc.poll()
        if code is None:
            if self.stopping and not child.signalled:  # started while the stop signal was handled
                child.signal(signal.SIGTERM)
            return
        if self.stopping or code == 0:
            log.info("worker for GPU %s exited with %s", child.gpu, code)
            child.done = True
            return
        self._schedule_restart(child, code)

    def _schedule_restart(self, child: Child, code: int) -> None:
        lived = time.monotonic() - child.started_at
        child.quick_failures = child.quick_failures + 1 if lived < QUICK_FAILURE_S else 1
        if child.quick_failures >= MAX_QUICK_FAILURES:
            log.error(
                "worker for GPU %s died %d times within %.0f s of starting; giving up, stopping the others",
                child.gpu,
                child.quick_failures,
                QUICK_FAILURE_S,
            )
            child.done = True
            self.gave_up = True
            self._on_signal(signal.SIGTERM, None)
            return
        delay = min(BACKOFF_MAX_S, 2.0 ** (child.quick_failures - 1))
        log.warning(
            "worker for GPU %s died (exit %s after %.1f s); restarting in %.0f s",
            child.gpu,
            code,
            lived,
            delay,
        )
        child.restart_at = time.monotonic() + delay


def worker_argv(name: str | None, loglevel: str) -> list[str]:
    """The celery command line for one single-GPU worker, every delivery flag explicit.

    Queue order is priority order (the worker always takes from the first non-empty queue):
    interactive jobs, then bulk jobs. Webhook deliveries (``sdqueue.notify``) are not consumed
    here but by ``sdqueue notifier`` (see ``notifier_argv``), so they never take a job slot.
    The job-slot count is the executor's (settings.job_slots). Nothing here imports torch: this
    runs in the process that then execs Celery, which imports it once.
    """
    from sdqueue.names import lane_queue
    from sdqueue_worker.settings import get_worker_settings, job_slots

    settings = get_worker_settings()
    slots = job_slots(settings.max_batch)
    lanes = [lane_queue(lane, settings.model_alias) for lane in ("interactive", "bulk")]
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "sdqueue_worker.app",
        "worker",
        "--concurrency",
        str(slots),
        "--prefetch-multiplier",
        "1",
        "--queues",
        ",".join(lanes),
        "--task-events",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
    ]
    return argv + (["--hostname", name] if name else [])


def notifier_argv(name: str | None, loglevel: str, concurrency: int) -> list[str]:
    """The celery command line of the CPU-only webhook notifier (queue ``sdqueue.notify`` only)."""
    from sdqueue.names import NOTIFY_QUEUE

    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "sdqueue_worker.notifier",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "--queues",
        NOTIFY_QUEUE,
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
    ]
    return argv + (["--hostname", name] if name else [])


def run_notifier(name: str | None, loglevel: str, concurrency: int | None) -> int:
    """``sdqueue notifier``: deliver webhooks in this process (replaced by celery; never returns)."""
    from sdqueue_worker.settings import get_worker_settings

    argv = notifier_argv(name, loglevel, concurrency or get_worker_settings().notify_concurrency)
    os.execv(argv[0], argv)
    return 0  # not reached


def run_worker(gpus: str | None, name: str | None, loglevel: str) -> int:
    """``sdqueue worker``: one worker in this process, or one per GPU with ``gpus``."""
    if gpus:
        return launch_workers(gpus, name, loglevel)
    argv = worker_argv(name, loglevel)
    os.execv(argv[0], argv)
    return 0  # not reached


def build_children(gpus: str, name: str | None, loglevel: str) -> list[Child]:
    """One ``Child`` per GPU, each with its own argv (from ``worker_argv``) and environment."""
    environ = dict(os.environ)
    children = []
    for index, gpu in enumerate(parse_gpus(gpus, environ)):
        env = child_env(environ, gpu, index)
        stale = [Path(env[key]) for key in ("SDQ_HEARTBEAT_FILE", "SDQ_READY_FILE") if env.get(key)]
        children.append(Child(gpu, worker_argv(child_name(name, gpu), loglevel), env, stale_files=stale))
    return children


def launch_workers(gpus: str, name: str | None, loglevel: str) -> int:
    """Run one single-concurrency worker per GPU until stopped; returns the exit code."""
    logging.basicConfig(
        level=getattr(logging, loglevel.upper(), logging.INFO),
        format="[%(asctime)s: %(levelname)s/launcher] %(message)s",
    )
    try:
        children = build_children(gpus, name, loglevel)
    except LauncherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("one worker per GPU: %s", ", ".join(f"{c.gpu} -> {c.argv[-1]}" for c in children))
    return Launcher(children).run()
