"""``sdqueue worker --gpus``: one single-concurrency worker per GPU, supervised by a launcher.

The end-to-end test runs the real launcher on CPU with ``gpus="0,1"`` against its own
redis-server (it kills processes), moto S3 and the tiny model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devstack.services import RedisServer, free_port, wait_for
from sdqueue import SdQueue, Txt2ImgJob
from sdqueue_worker.launch import Child, Launcher, LauncherError, child_env, child_name, parse_gpus
from tests.helpers import ROOT, settings_from

LAUNCH = "import sys; from sdqueue_worker.launch import launch_workers; sys.exit(launch_workers('0,1', None, 'INFO'))"


# --- the pure parts -------------------------------------------------------------------------


def test_gpu_list_parsing(tmp_path: Path) -> None:
    assert parse_gpus("0,1") == ["0", "1"]
    assert parse_gpus(" 3 , 5 ") == ["3", "5"]
    assert parse_gpus("all", {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    for bad in ("", "0,0", ","):
        with pytest.raises(LauncherError):
            parse_gpus(bad)


def test_all_gpus_come_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in nvidia-smi on PATH prints what the real one prints on a 2-GPU host."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = -L ] || exit 9\n'
        "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)'\n"
        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert parse_gpus("all", {}) == ["0", "1"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LauncherError, match="nvidia-smi"):
        parse_gpus("all", {})


def test_children_get_their_own_gpu_name_files_and_port() -> None:
    assert child_name(None, "1") == "gpu1@%h"
    assert child_name("sd", "0") == "sd-gpu0@%h"
    assert child_name("sd@box", "2") == "sd-gpu2@box"
    base = {
        "SDQ_HEARTBEAT_FILE": "/tmp/hb",
        "SDQ_READY_FILE": "/tmp/ready",
        "SDQ_METRICS_PORT": "9808",
        "X": "y",
    }
    env = child_env(base, "3", 1)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["X"] == "y"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert (env["SDQ_HEARTBEAT_FILE"], env["SDQ_READY_FILE"]) == ("/tmp/hb.gpu3", "/tmp/ready.gpu3")
    assert env["SDQ_METRICS_PORT"] == "9809"
    assert "SDQ_HEARTBEAT_FILE" not in child_env({}, "0", 0)


def _child(gpu: str, code: str) -> Child:
    return Child(gpu, [sys.executable, "-c", code], dict(os.environ))


def test_gives_up_after_quick_failures_and_stops_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sdqueue_worker.launch.BACKOFF_MAX_S", 0.05)
    crashing, healthy = _child("0", "import sys; sys.exit(3)"), _child("1", "import time; time.sleep(60)")
    began = time.monotonic()
    code = Launcher([crashing, healthy]).run()
    took = time.monotonic() - began
    print(f"gave up after {crashing.quick_failures} quick failures in {took:.1f}s")
    assert code == 1 and crashing.quick_failures == 5
    assert healthy.proc is not None and healthy.proc.returncode == -signal.SIGTERM
    assert took < 30


def test_a_child_that_exits_cleanly_is_not_restarted() -> None:
    child = _child("0", "pass")
    assert Launcher([child]).run() == 0
    assert child.proc is not None and child.proc.returncode == 0 and child.quick_failures == 0


RECORD_SIGNAL = (
    "import pathlib, signal, sys, time\n"
    "out = pathlib.Path(sys.argv[1])\n"
    "for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):\n"
    "    signal.signal(sig, lambda n, _: (out.write_text(signal.Signals(n).name), sys.exit(0)))\n"
    "pathlib.Path(sys.argv[2]).touch()\n"
    "time.sleep(60)\n"
)
"""A child that writes the name of the stop signal it gets to argv[1] and exits 0."""


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_every_stop_signal_reaches_every_child(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGQUIT too (Celery's cold shutdown): each child gets the signal the launcher got."""
    paths = [(tmp_path / f"{gpu}.got", tmp_path / f"{gpu}.up") for gpu in "01"]
    argvs = [[sys.executable, "-c", RECORD_SIGNAL, str(got), str(up)] for got, up in paths]
    code = (
        "import os, sys; from sdqueue_worker.launch import Child, Launcher; "
        f"sys.exit(Launcher([Child(str(i), a, dict(os.environ)) for i, a in enumerate({argvs!r})]).run())"
    )
    launcher = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ))
    try:
        wait_for(lambda: all(up.exists() for _, up in paths), 60, "both children up")
        launcher.send_signal(sig)
        assert launcher.wait(30) == 0
    finally:
        launcher.kill()
    assert [got.read_text() for got, _ in paths] == [sig.name, sig.name]


# --- the real thing: two worker processes on CPU --------------------------------------------


@pytest.fixture(scope="module")
def own_redis(logdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(logdir).start()
    yield server
    server.stop()


def two_free_ports() -> int:
    """A port P such that P and P+1 are free (the launcher gives worker N port P+N)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def launcher_env(env: dict[str, str], own_redis: RedisServer, logdir: Path) -> dict[str, str]:
    return {
        **env,
        "SDQ_REDIS_URL": own_redis.url,
        "SDQ_DEVICE": "cpu",
        "SDQ_HEARTBEAT_FILE": str(logdir / "launcher.heartbeat"),
        "SDQ_READY_FILE": str(logdir / "launcher.ready"),
        "SDQ_METRICS_PORT": str(two_free_ports()),
        "SDQ_METRICS_ADDR": "127.0.0.1",
    }


def jobs_counted(port: int) -> float:
    """Succeeded jobs on one worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sdqueue_jobs_total{") and 'outcome="succeeded"' in line
    )


def _ready_files(launcher_env: dict[str, str]) -> list[Path]:
    return [Path(f"{launcher_env['SDQ_READY_FILE']}.gpu{gpu}") for gpu in ("0", "1")]


def _heartbeats(client: redis.Redis) -> dict[str, int]:
    """Celery node name -> pid, from the workers' Redis heartbeat keys."""
    beats = {}
    for key in client.scan_iter("sdq:worker:*"):
        body = client.get(key)
        if body:
            beats[key.decode().removeprefix("sdq:worker:")] = int(json.loads(body)["pid"])
    return beats


def _cuda_visible(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(
        item.decode().split("=", 1)[1] for item in environ if item.startswith(b"CUDA_VISIBLE_DEVICES=")
    )


def test_launcher_runs_restarts_and_stops_one_worker_per_gpu(
    launcher_env: dict[str, str], logdir: Path, s3
) -> None:  # type: ignore[no-untyped-def]
    for path in _ready_files(launcher_env):
        path.unlink(missing_ok=True)
    log = open(logdir / "launcher.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH],
        env=launcher_env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _run_scenario(proc, launcher_env, s3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _run_scenario(  # type: ignore[no-untyped-def]
    proc: subprocess.Popen[bytes], launcher_env: dict[str, str], s3
) -> None:
    queue = SdQueue(settings_from(launcher_env))
    client = redis.Redis.from_url(launcher_env["SDQ_REDIS_URL"])
    wait_for(
        lambda: all(p.exists() for p in _ready_files(launcher_env)) or proc.poll() is not None,
        240,
        "two workers",
    )
    assert proc.poll() is None, "launcher exited early"
    pongs = {name for reply in queue.celery.control.ping(timeout=2) for name in reply}
    hostname = next(iter(pongs), "none@none").split("@", 1)[1]
    assert pongs == {f"gpu0@{hostname}", f"gpu1@{hostname}"}
    wait_for(lambda: len(_heartbeats(client)) == 2, 10, "heartbeats")
    pids = _heartbeats(client)
    assert {_cuda_visible(pid) for pid in pids.values()} == {"0", "1"}
    assert _cuda_visible(pids[f"gpu0@{hostname}"]) == "0"

    _both_drain_the_queue(queue, s3, set(pids.values()))
    base = int(launcher_env["SDQ_METRICS_PORT"])
    counted = [jobs_counted(base), jobs_counted(base + 1)]
    print(f"succeeded jobs on /metrics of ports {base} and {base + 1}: {counted}")
    assert sum(counted) == 8 and all(counted)
    _killed_child_is_restarted(proc, client, launcher_env, pids, f"gpu0@{hostname}", f"gpu1@{hostname}")
    _sigterm_stops_everything(proc, client)


def _both_drain_the_queue(queue: SdQueue, s3, pids: set[int]) -> None:  # type: ignore[no-untyped-def]
    handles = [
        queue.submit(Txt2ImgJob(prompt=f"launcher {i}", width=64, height=64, steps=2)) for i in range(8)
    ]
    served: dict[int, int] = {}
    for handle in handles:
        result = handle.wait(timeout=120)
        bucket, key = result.manifest_url.removeprefix("s3://").split("/", 1)
        pid = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["worker"]["pid"]
        served[pid] = served.get(pid, 0) + 1
    print(f"8 jobs served per worker pid: {served}")
    assert set(served) == pids


def _killed_child_is_restarted(
    proc: subprocess.Popen[bytes],
    client: redis.Redis,
    launcher_env: dict[str, str],
    pids: dict[str, int],
    victim: str,
    other: str,
) -> None:
    ready = Path(f"{launcher_env['SDQ_READY_FILE']}.gpu0")
    os.kill(pids[victim], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: not ready.exists(), 30, "stale ready file removed")
    wait_for(
        lambda: ready.exists() and _heartbeats(client).get(victim, pids[victim]) != pids[victim],
        240,
        "restarted worker",
    )
    print(f"killed worker {victim} back (ready, new pid) after {time.monotonic() - killed_at:.1f}s")
    beats = _heartbeats(client)
    assert proc.poll() is None
    assert beats[other] == pids[other]
    assert _cuda_visible(beats[victim]) == "0"


def _sigterm_stops_everything(proc: subprocess.Popen[bytes], client: redis.Redis) -> None:
    children = set(_heartbeats(client).values())
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    print(f"launcher and {len(children)} workers stopped {time.monotonic() - began:.1f}s after SIGTERM")
    assert code == 0
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
