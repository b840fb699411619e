"""``make dev``: a local stack that stays up until Ctrl-C, for trying the README's snippets.

Starts redis-server, moto's S3 server (bucket ``sdqueue``), one worker on the tiny model, the
webhook notifier and Flower (and the HTTP front door, ``sdqueue serve``, when this checkout has
it), all on loopback; prints their URLs and the ``export`` lines that point a shell at them;
stops everything on SIGINT or SIGTERM. ``make demo`` is the one-shot variant.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

import boto3

from devstack.services import (
    ROOT,
    FlowerProcess,
    MotoServer,
    NotifierProcess,
    RedisServer,
    Service,
    WorkerProcess,
    free_port,
    port_open,
    stack_env,
    wait_for,
)

READY = "sdqueue dev stack is up"
EXPORTED = (
    "SDQ_REDIS_URL",
    "SDQ_S3_ENDPOINT_URL",
    "SDQ_OUTPUT_BUCKET",
    "SDQ_INPUT_BUCKETS",
    "SDQ_WEBHOOK_HOSTS",
    "SDQ_WEBHOOK_SECRET",
)
EXPORTED_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class FrontDoor(Service):
    """``sdqueue serve`` (the HTTP API), started only where the command exists."""

    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        super().__init__("serve", logdir)
        self.env = env
        self.port = free_port()

    @staticmethod
    def available(env: dict[str, str]) -> bool:
        out = subprocess.run(
            [sys.executable, "-m", "sdqueue.cli", "serve", "--help"], env=env, capture_output=True, text=True
        )
        return out.returncode == 0 and "--port" in out.stdout

    def start(self) -> FrontDoor:
        self._spawn(
            [sys.executable, "-m", "sdqueue.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            self.env,
        )
        wait_for(lambda: port_open(self.port) or not self.alive(), 60, "sdqueue serve")
        return self


def start_stack(workdir: Path, started: list[Service]) -> tuple[dict[str, str], list[str]]:
    """Start every service; returns the stack's environment and the lines to print."""
    redis = RedisServer(workdir, appendonly=True).start()
    started.append(redis)
    moto = MotoServer(workdir).start()
    started.append(moto)
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    env = stack_env(
        redis.url,
        moto.url,
        str(ROOT / ".cache" / "tiny-sd"),
        webhook_hosts="127.0.0.1,localhost",
        webhook_secret=secret,
    )
    s3 = boto3.client(
        "s3",
        endpoint_url=moto.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for bucket in ("sdqueue", "inputs"):
        s3.create_bucket(Bucket=bucket)
    for service in (
        WorkerProcess(workdir, env, name="dev"),
        NotifierProcess(workdir, env, name="dev-notifier"),
    ):
        started.append(service.start())
    flower = FlowerProcess(workdir, env, port=5555 if not port_open(5555) else None).start()
    started.append(flower)
    lines = [
        f"Redis        {redis.url}",
        f"S3 (moto)    {moto.url}  (buckets sdqueue, inputs)",
        f"Flower       {flower.url}",
    ]
    if FrontDoor.available(env):
        door = FrontDoor(workdir, env).start()
        started.append(door)
        lines.append(f"HTTP API     http://127.0.0.1:{door.port}")
    lines.append(f"Logs         {workdir}")
    return env, lines


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sdqueue-dev-"))
    started: list[Service] = []
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        env, lines = start_stack(workdir, started)
        print("\n".join(lines))
        print("\n# In another shell:")
        for key in (*EXPORTED, *EXPORTED_AWS):
            print(f"export {key}={env[key]}")
        print('#   sdqueue submit txt2img "a lighthouse" --width 128 --height 128 --steps 10 --wait')
        print(f"\n{READY}: Ctrl-C stops it.", flush=True)
        while not stop.wait(1.0):
            dead = [s.name for s in started if not s.alive()]
            if dead:
                print(
                    f"stopped by itself: {', '.join(dead)} (logs in {workdir}); stopping the rest", flush=True
                )
                return 1
        return 0
    finally:
        print("stopping...", flush=True)
        for service in reversed(started):
            service.stop()


if __name__ == "__main__":
    sys.exit(main())
