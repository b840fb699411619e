"""``make dev``'s entry (python -m devstack.dev) as a subprocess: it prints export lines that a
shell can use to submit a job, serves Flower, and stops everything cleanly on SIGINT."""

from __future__ import annotations

import os
import queue as queue_module
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from devstack.services import ROOT, port_open
from tests.helpers import sdqueue


def read_until(lines: queue_module.Queue[str], marker: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue_module.Empty:
            continue
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"no {marker!r} after {timeout}s:\n" + "".join(seen))


def test_make_dev_stays_up_serves_a_job_and_stops_on_ctrl_c(tiny_model: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDQ_", "AWS_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack.dev"],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue_module.Queue[str] = queue_module.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()
    try:
        printed = read_until(lines, "sdqueue dev stack is up", 240)
        exports = dict(
            line.removeprefix("export ").strip().split("=", 1)
            for line in printed
            if line.startswith("export ")
        )
        print("".join(printed))
        assert {"SDQ_REDIS_URL", "SDQ_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"} <= set(exports)
        flower = next(line.split()[-1] for line in printed if line.startswith("Flower"))
        done = sdqueue(
            {**env, **exports}, "submit", "txt2img", "from make dev", "--width", "64", "--height", "64",
            "--steps", "2", "--wait",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert '"state": "succeeded"' in done.stdout
        with urllib.request.urlopen(f"{flower}/healthcheck", timeout=5) as response:
            assert response.status == 200
        redis_port = int(exports["SDQ_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(90)
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert code == 0, "".join(rest)
    assert not port_open(redis_port), "Redis must be stopped with the rest"
