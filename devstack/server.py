"""``sdqueue serve`` as a real process on a free loopback port (tests, benchmark, dev)."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from devstack.services import Service, free_port, wait_for


class ServerProcess(Service):
    """The HTTP front door started through the real command line."""

    def __init__(
        self, logdir: Path, env: dict[str, str], name: str = "server", port: int | None = None
    ) -> None:
        super().__init__(name, logdir)
        self.env = dict(env)
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"sdqueue serve exited:\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return bool(json.load(response).get("ok"))
        except OSError:
            return False

    def start(self, timeout: float = 60) -> ServerProcess:
        argv = [sys.executable, "-m", "sdqueue.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self._spawn(argv, self.env)
        wait_for(self._healthy, timeout, "sdqueue serve")
        return self
