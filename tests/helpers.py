"""Helpers shared by the test modules (no test module imports another): paths, settings from a
stack environment, test images, a private stack, the CLI as a subprocess."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from devstack.services import (
    NotifierProcess,
    RedisServer,
    WorkerProcess,
    free_port,
    port_open,
    stack_env,
    wait_for,
)
from sdqueue.client import SdQueue
from sdqueue.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / ".cache" / "tiny-sd"


def settings_from(env: dict[str, str]) -> Settings:
    """Client settings from a stack's ``SDQ_*`` environment."""
    return Settings(
        **{k[4:].lower(): v for k, v in env.items() if k.startswith("SDQ_") and k != "SDQ_READY_FILE"}
    )


def png_bytes(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A smooth colour field like those the tiny VAE reconstructs well."""
    import torch

    from sdqueue_worker.tiny_model import smooth_images

    tensor = smooth_images(1, size, torch.Generator().manual_seed(seed))[0]
    return Image.fromarray(((tensor.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))


def read_png(s3: Any, bucket: str, key: str) -> np.ndarray:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def manifest_of(s3: Any, result: Any) -> dict[str, Any]:
    """The manifest JSON of a finished job, read straight from S3."""
    bucket, key = result.manifest_url.removeprefix("s3://").split("/", 1)
    body: dict[str, Any] = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    return body


@dataclass
class Stack:
    """A redis-server, a worker process with extra settings, and a client for both."""

    redis: RedisServer
    worker: WorkerProcess | None
    env: dict[str, str]
    queue: SdQueue
    notifier: NotifierProcess | None = None


@contextmanager
def own_stack(
    logdir: Path,
    s3_url: str,
    model: str,
    name: str,
    with_worker: bool = True,
    with_notifier: bool = False,
    **settings: Any,
) -> Iterator[Stack]:
    """Start redis (and a worker unless ``with_worker`` is False, and a webhook notifier with
    ``with_notifier``) with ``SDQ_*`` overrides."""
    redis = RedisServer(logdir).start()
    env = stack_env(redis.url, s3_url, model, **settings)
    notifier = None
    worker = None
    try:
        worker = WorkerProcess(logdir, env, name=name).start() if with_worker else None
        notifier = NotifierProcess(logdir, env, name=f"{name}-notifier").start() if with_notifier else None
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            os.environ[key] = env[key]
        yield Stack(redis, worker, env, SdQueue(settings_from(env)), notifier)
    finally:
        for process in (notifier, worker):
            if process is not None:
                process.stop()
        redis.stop()


def sdqueue(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run the real ``sdqueue`` command line (``python -m sdqueue.cli``) as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "sdqueue.cli", *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def backend_meta(queue: SdQueue, job_id: str) -> dict[str, Any] | None:
    """The result-backend entry the worker wrote for a job (not the client's cancel key)."""
    raw = queue.redis.get(f"celery-task-meta-{job_id}")
    return json.loads(raw) if raw else None


def wait_cancelled_by_worker(queue: SdQueue, job_id: str, timeout: float = 90) -> dict[str, Any]:
    """Poll until the worker recorded the job as cancelled: Celery's REVOKED, whose reason
    (``exc_message[0]``) says "cancelled ..."; returns that entry.

    Fails at once if the worker recorded any other final state (it ignored the cancel)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = backend_meta(queue, job_id) or {}
        assert meta.get("status") not in ("SUCCESS", "FAILURE"), f"the worker did not cancel {job_id}: {meta}"
        if meta.get("status") == "REVOKED" and revoked_reason(meta).startswith("cancelled"):
            return meta
        time.sleep(0.05)
    raise AssertionError(f"the worker recorded no cancel of {job_id} within {timeout}s")


def revoked_reason(meta: dict[str, Any]) -> str:
    """The reason of a REVOKED result-backend entry (``TaskRevokedError(reason)``)."""
    result = meta.get("result") or {}
    message = result.get("exc_message") if isinstance(result, dict) else None
    parts = message if isinstance(message, (list, tuple)) else [message]
    return str(parts[0]) if parts and parts[0] is not None else ""


def assert_no_outputs(s3: Any, job_id: str, bucket: str = "sdqueue", prefix: str = "outputs") -> None:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{job_id}/")
    assert listing.get("KeyCount", 0) == 0, f"{job_id} left outputs: {listing.get('Contents')}"


def assert_progress_stopped(queue: SdQueue, job_id: str, total: int, settle_s: float = 1.0) -> int:
    """The last progress step is below ``total`` and does not move for ``settle_s``; returns it."""
    first = (queue.handle(job_id).progress() or {}).get("step", 0)
    time.sleep(settle_s)
    last = (queue.handle(job_id).progress() or {}).get("step", 0)
    assert first == last < total, f"progress of {job_id} went on: {first} -> {last} of {total}"
    return int(last)


def start_flower(
    env: dict[str, str], logdir: Path, *options: str, log_name: str = "flower.log"
) -> tuple[subprocess.Popen[bytes], int]:
    """A real Flower (``celery -A sdqueue.app flower``) on a free loopback port, once its port
    answers; ``options`` are Flower's own (auth, columns)."""
    port = free_port()
    log = open(logdir / log_name, "ab")
    command = [sys.executable, "-m", "celery", "-A", "sdqueue.app", "flower"]
    process = subprocess.Popen(
        [*command, f"--port={port}", "--address=127.0.0.1", *options],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: port_open(port), 60, "flower")
    return process, port
