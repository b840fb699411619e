"""Start and stop real local services on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


class Service:
    """A subprocess with start/stop/kill, its output in a log file."""

    def __init__(self, name: str, logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class RedisServer(Service):
    """A real redis-server on a free port; with ``appendonly`` it survives restarts."""

    def __init__(
        self,
        logdir: Path,
        appendonly: bool = False,
        port: int | None = None,
        password: str | None = None,
        replica_of: int | None = None,
    ) -> None:
        super().__init__(f"redis-{port or 'x'}", logdir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.replica_of = replica_of
        self.datadir = Path(tempfile.mkdtemp(prefix="sdq-redis-", dir=logdir))

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install it (apt-get install redis-server)")
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.datadir),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.replica_of:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self._spawn(argv)
        wait_for(lambda: port_open(self.port), 10, "redis-server")
        return self


class MotoServer(Service):
    """moto's S3 server: a real HTTP S3 endpoint on loopback."""

    def __init__(self, logdir: Path, port: int | None = None) -> None:
        super().__init__("moto", logdir)
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)])
        wait_for(self._healthy, 20, "moto server")
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=0.5):
                return True
        except Exception:
            return False


def stack_env(redis_url: str, s3_url: str, model: str, **overrides: Any) -> dict[str, str]:
    """Environment for a producer or worker talking to the local services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env.update(
        {
            "SDQ_REDIS_URL": redis_url,
            "SDQ_S3_ENDPOINT_URL": s3_url,
            "SDQ_MODEL": model,
            "SDQ_OUTPUT_BUCKET": "sdqueue",
            "SDQ_INPUT_BUCKETS": "sdqueue,inputs",
            # the local redis-server keeps nothing on disk: say that losing queued jobs is accepted
            "SDQ_ACCEPT_VOLATILE_BROKER": "true",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update({f"SDQ_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


class WorkerProcess(Service):
    """A real worker process started through ``sdqueue worker``."""

    command = "worker"

    def __init__(
        self, logdir: Path, env: dict[str, str], name: str = "worker", args: list[str] | None = None
    ) -> None:
        super().__init__(name, logdir)
        self.env = dict(env)
        self.args = args or []
        self.ready_file = logdir / f"{name}.ready"
        self.env["SDQ_READY_FILE"] = str(self.ready_file)
        self.hostname = f"{name}@sdqueue-test"

    def start(self, wait: bool = True, timeout: float = 120.0) -> WorkerProcess:
        self.ready_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "sdqueue.cli", self.command, "--name", self.hostname, *self.args]
        self._spawn(argv, env=self.env)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the worker has loaded its model and consumes; raise if it died instead."""
        wait_for(lambda: self.ready_file.exists() or not self.alive(), timeout, f"worker {self.name}")
        if not self.alive():
            raise RuntimeError(f"worker {self.name} exited at start:\n{self.tail()}")


class NotifierProcess(WorkerProcess):
    """A real webhook notifier started through ``sdqueue notifier`` (CPU only, no model)."""

    command = "notifier"

    def __init__(self, logdir: Path, env: dict[str, str], name: str = "notifier") -> None:
        super().__init__(logdir, {k: v for k, v in env.items() if k != "SDQ_METRICS_PORT"}, name)


class FlowerProcess(Service):
    """Flower (``celery -A sdqueue.app flower``) on loopback, watching the stack's broker."""

    def __init__(self, logdir: Path, env: dict[str, str], port: int | None = None) -> None:
        super().__init__("flower", logdir)
        self.env = dict(env)
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> FlowerProcess:
        columns = "name,uuid,state,result,received,started,runtime,worker"
        argv = [sys.executable, "-m", "celery", "-A", "sdqueue.app", "flower"]
        self._spawn(
            [*argv, f"--port={self.port}", "--address=127.0.0.1", f"--tasks_columns={columns}"], self.env
        )
        wait_for(self._healthy, timeout, "flower")
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthcheck", timeout=0.5):
                return True
        except Exception:
            return False


class SentinelServer(Service):
    """``redis-server --sentinel`` on a free port, monitoring ``master_name`` at ``master_port``."""

    def __init__(
        self, logdir: Path, master_port: int, master_name: str = "mymaster", quorum: int = 2
    ) -> None:
        self.port = free_port()
        super().__init__(f"sentinel-{self.port}", logdir)
        self.config = logdir / f"sentinel-{self.port}.conf"
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {logdir}\n"
            f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {master_name} 1000\n"
            f"sentinel failover-timeout {master_name} 5000\n"
            f"sentinel parallel-syncs {master_name} 1\n"
        )

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.port}"

    def start(self) -> SentinelServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install it (apt-get install redis-server)")
        self._spawn([binary, str(self.config), "--sentinel"])
        wait_for(lambda: port_open(self.port), 10, "redis sentinel")
        return self
