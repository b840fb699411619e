"""The lease keeper's writes, against a recording stand-in for the Redis client (the kill -9
tests in tests/integration/test_faults.py show the same against a real redis-server)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sdqueue_worker import lease, state
from sdqueue_worker.lease import LeaseKeeper, heartbeat, refresh_unacked


class Recorder:
    """Records the Redis calls the lease keeper makes; ``fail`` makes every call raise."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.fail = fail

    def _record(self, name: str, *args: Any, **kwargs: Any) -> int:
        if self.fail:
            raise ConnectionError("redis down")
        self.calls.append((name, args, kwargs))
        return 1

    def zadd(self, *args: Any, **kwargs: Any) -> int:
        return self._record("zadd", *args, **kwargs)

    def eval(self, *args: Any, **kwargs: Any) -> int:
        return self._record("eval", *args, **kwargs)

    def set(self, *args: Any, **kwargs: Any) -> int:
        return self._record("set", *args, **kwargs)


def consumer_holding(tags: list[str], client: Recorder) -> Any:
    @contextmanager
    def conn_or_acquire() -> Any:
        yield client

    channel = SimpleNamespace(
        qos=SimpleNamespace(_delivered=dict.fromkeys(tags)),
        conn_or_acquire=conn_or_acquire,
        unacked_index_key="unacked_index",
    )
    return SimpleNamespace(task_consumer=SimpleNamespace(channel=channel))


def worker_state(client: Recorder, heartbeat_file: str | None = None, vt: int = 8) -> Any:
    settings = SimpleNamespace(visibility_timeout_s=vt, heartbeat_file=heartbeat_file, lease_refresh_s=0.01)
    return SimpleNamespace(
        settings=settings,
        lock=threading.Lock(),
        running={"job-a": "w@h:tok-a", "job-b": "w@h:tok-b"},
        redis=client,
        executor=SimpleNamespace(batches_run=7, busy_seconds=1.23456),
        runtime=SimpleNamespace(startup={"load_s": 1.23456, "ready_s": 9.8765}),
        hostname="w@h",
    )


def test_refresh_stamps_the_held_messages_with_the_current_time() -> None:
    client = Recorder()
    before = time.time()
    assert refresh_unacked(consumer_holding(["t1", "t2"], client)) == 2
    after = time.time()
    [(name, args, kwargs)] = client.calls
    assert name == "zadd" and args[0] == "unacked_index" and kwargs == {"xx": True}
    assert set(args[1]) == {"t1", "t2"}
    assert all(before <= stamp <= after for stamp in args[1].values()), "a stamp is the time of writing"


def test_refresh_with_nothing_held_writes_nothing() -> None:
    client = Recorder()
    assert refresh_unacked(consumer_holding([], client)) == 0
    assert client.calls == []


def test_heartbeat_renews_run_leases_and_writes_the_alive_key(tmp_path: Path) -> None:
    client = Recorder()
    beat = tmp_path / "beat"
    before = time.time()
    heartbeat(worker_state(client, str(beat), vt=8), held=3)
    renewals = [args for name, args, _ in client.calls if name == "eval"]
    assert [(a[1], a[2], a[3], a[4]) for a in renewals] == [
        (1, "sdq:running:job-a", "w@h:tok-a", 4000),
        (1, "sdq:running:job-b", "w@h:tok-b", 4000),
    ]
    [(key, body)] = [args for name, args, _ in client.calls if name == "set"]
    [set_kwargs] = [kwargs for name, _, kwargs in client.calls if name == "set"]
    assert key == "sdq:worker:w@h" and set_kwargs == {"ex": 8}
    alive = json.loads(body)
    assert alive["held"] == 3 and alive["running"] == ["job-a", "job-b"]
    assert alive["batches"] == 7 and alive["busy_s"] == 1.235 and alive["pid"] > 0
    assert alive["startup"] == {"load_s": 1.23, "ready_s": 9.88}
    assert before <= alive["at"] <= time.time()
    assert beat.exists()


def test_the_alive_key_lives_at_least_five_seconds() -> None:
    client = Recorder()
    heartbeat(worker_state(client, vt=2), held=0)
    assert [kwargs for name, _, kwargs in client.calls if name == "set"] == [{"ex": 5}]


def run_loop(client: Recorder, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.3) -> None:
    monkeypatch.setattr(state, "_STATE", worker_state(client))
    stop = threading.Event()
    thread = threading.Thread(target=LeaseKeeper._loop, args=(consumer_holding(["t"], client), stop))
    thread.start()
    time.sleep(seconds)
    assert thread.is_alive(), "the lease thread must keep running"
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_the_loop_refreshes_every_interval_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    client = Recorder()
    run_loop(client, monkeypatch)
    rounds = sum(name == "zadd" for name, _, _ in client.calls)
    assert rounds >= 3 and sum(name == "set" for name, _, _ in client.calls) == rounds
    after_stop = len(client.calls)
    time.sleep(0.05)
    assert len(client.calls) == after_stop


def test_a_redis_error_does_not_end_the_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="sdqueue_worker.lease"):
        run_loop(Recorder(fail=True), monkeypatch)
    assert "lease refresh failed: redis down" in caplog.messages


def test_start_and_stop_run_the_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    client = Recorder()
    monkeypatch.setattr(state, "_STATE", worker_state(client))
    keeper = LeaseKeeper(SimpleNamespace())
    keeper.stop(None)  # Celery may stop a step that never started
    keeper.start(consumer_holding(["t"], client))
    time.sleep(0.1)
    [thread] = [t for t in threading.enumerate() if t.name == "sdq-lease"]
    assert thread.daemon, "the lease thread must not keep a dying worker alive"
    keeper.stop(None)
    deadline = time.monotonic() + 5
    while any(t.name == "sdq-lease" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "sdq-lease" for t in threading.enumerate())
    assert client.calls and lease.LeaseKeeper.shutdown is LeaseKeeper.stop
