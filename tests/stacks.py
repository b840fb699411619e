"""A private stack for tests that need worker settings of their own (webhooks, metrics).

Its own redis-server, so the shared worker of the session never takes these jobs; the S3
endpoint (moto) and the tiny model are shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from devstack.services import ROOT, RedisServer, WorkerProcess, stack_env
from producer.client import SdQueue
from tests.conftest import settings_from


@dataclass
class Stack:
    """A redis-server, a worker process with extra settings, and a client for both."""

    redis: RedisServer
    worker: WorkerProcess | None
    env: dict[str, str]
    queue: SdQueue


@contextmanager
def own_stack(logdir: Path, s3_url: str, model: str, name: str, with_worker: bool = True,
              **settings: Any) -> Iterator[Stack]:
    """Start redis (and a worker unless ``with_worker`` is False) with ``SDQ_*`` overrides."""
    redis = RedisServer(logdir).start()
    env = stack_env(redis.url, s3_url, model, **settings)
    worker = WorkerProcess(logdir, env, name=name).start() if with_worker else None
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        os.environ[key] = env[key]
    try:
        yield Stack(redis, worker, env, SdQueue(settings_from(env)))
    finally:
        if worker is not None:
            worker.stop()
        redis.stop()


def sdqueue(env: dict[str, str], *args: str, stdin: str | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the real ``sdqueue`` command line (``python -m producer.cli``) as a subprocess."""
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], env=env, cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout)
