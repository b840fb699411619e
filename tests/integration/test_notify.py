"""Completion notifications against a real worker: a signed webhook to a real local HTTP server
(retried with backoff, surviving a worker kill) and a Celery callback task consumed by a real
Celery worker of a "web backend" app."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from devstack.services import MotoServer, NotifierProcess
from sdqueue import JobValidationError, Txt2ImgJob
from sdqueue.names import TXT2IMG_TASK
from sdqueue.webhooks import WebhookSignatureError, verify
from tests.helpers import Stack, own_stack

SECRET = "whsec_" + base64.b64encode(b"sdqueue-test-secret-0123456789").decode()
SMALL = {"width": 64, "height": 64, "steps": 2}
CALLBACK_QUEUE = "webapp.callbacks"


@dataclass
class Receiver:
    """A real HTTP server on loopback recording webhooks. Paths: /ok/.. answers 204, /always/S/.. S,
    /fail/N/.. 503 N times then 204, /retry-after/N/.. 503 with Retry-After: N once then 204,
    /slow/S/.. 204 after S seconds."""

    server: ThreadingHTTPServer
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def status_for(self, path: str, msg_id: str) -> int:
        with self.lock:
            seen = sum(1 for r in self.requests if r["headers"].get("webhook-id") == msg_id)
        kind, arg = path.split("/")[1:3]
        if kind == "slow":
            time.sleep(float(arg))
            return 204
        if kind == "always":
            return int(arg)
        if (kind == "fail" and seen <= int(arg)) or (kind == "retry-after" and seen == 1):
            return 503
        return 204

    def wait_for(self, path: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                hits = [r for r in self.requests if r["path"] == path]
            if len(hits) >= count:
                return hits
            time.sleep(0.05)
        raise AssertionError(f"{len(hits)} of {count} webhook requests to {path} after {timeout}s")


def start_receiver() -> Receiver:
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            record = {
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
                "at": time.monotonic(),
            }
            with receiver.lock:
                receiver.requests.append(record)
            status = receiver.status_for(self.path, record["headers"].get("webhook-id", ""))
            self.send_response(status)
            if status == 503 and self.path.startswith("/retry-after/"):
                self.send_header("Retry-After", self.path.split("/")[2])
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = Receiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = start_receiver()
    yield rec
    rec.server.shutdown()


@pytest.fixture(scope="module")
def stack(logdir: Path, moto: MotoServer, s3: Any, tiny_model: str, receiver: Receiver) -> Iterator[Stack]:
    with own_stack(
        logdir,
        moto.url,
        tiny_model,
        "notify",
        with_notifier=True,
        webhook_hosts=f"127.0.0.1:{receiver.server.server_address[1]},hooks.example.com",
        callback_tasks="webapp.job_done",
        callback_queues=CALLBACK_QUEUE,
        webhook_secret=SECRET,
        webhook_backoff_s=0.4,
        webhook_max_attempts=5,
        visibility_timeout_s=5,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def callbacks(stack: Stack) -> Iterator[list[dict[str, Any]]]:
    """The web backend's own Celery app and worker, consuming its callback queue."""
    app = Celery("webapp", broker=stack.redis.url, set_as_current=False)
    app.conf.update(accept_content=["json"], task_serializer="json", worker_hijack_root_logger=False)
    received: list[dict[str, Any]] = []

    @app.task(name="webapp.job_done")
    def job_done(job_id: str, state: str, result: Any = None, error: Any = None) -> None:
        received.append({"job_id": job_id, "state": state, "result": result, "error": error})

    with start_worker(app, pool="solo", perform_ping_check=False, queues=[CALLBACK_QUEUE]):
        yield received


def submit_and_wait(stack: Stack, job: Txt2ImgJob) -> None:
    stack.queue.submit(job).wait(timeout=120)


def data_of(request: dict[str, Any]) -> dict[str, Any]:
    return json.loads(request["body"])["data"]


def wait_callback(received: list[dict[str, Any]], job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [call for call in received if call["job_id"] == job_id]
        if hits:
            return hits[0]
        time.sleep(0.05)
    raise AssertionError(f"no callback for {job_id}")


def test_webhook_is_signed_and_retried_with_growing_backoff(stack: Stack, receiver: Receiver) -> None:
    path = f"/fail/3/{uuid.uuid4().hex[:6]}"
    handle = stack.queue.submit(Txt2ImgJob(prompt="hooked", webhook_url=receiver.url(path), seed=3, **SMALL))
    result = handle.wait(timeout=120)
    attempts = receiver.wait_for(path, 4)
    gaps = [round(b["at"] - a["at"], 2) for a, b in zip(attempts, attempts[1:], strict=False)]
    print(f"webhook attempts: 3 x 503 then 204; gaps between attempts {gaps}s (backoff base 0.4s)")
    assert len({a["headers"]["webhook-id"] for a in attempts}) == 1, "the webhook-id is the same on retries"
    for attempt in attempts:
        verify(SECRET, attempt["headers"], attempt["body"])
    data = data_of(attempts[-1])
    assert data["job_id"] == handle.job_id and data["state"] == "succeeded"
    assert [image["url"] for image in data["result"]["images"]] == [image.url for image in result.images]
    assert gaps[2] > gaps[0], "backoff must grow"
    time.sleep(1.5)
    assert len(receiver.wait_for(path, 4)) == 4, "no attempt after the 2xx"


def test_webhook_gives_up_after_max_attempts(stack: Stack, receiver: Receiver) -> None:
    path = f"/always/500/{uuid.uuid4().hex[:6]}"
    submit_and_wait(stack, Txt2ImgJob(prompt="never answered", webhook_url=receiver.url(path), **SMALL))
    attempts = receiver.wait_for(path, 5)
    time.sleep(8 * 0.4 * 2 + 1)
    assert len(receiver.wait_for(path, 5)) == 5, "exactly SDQ_WEBHOOK_MAX_ATTEMPTS tries"
    client_error = f"/always/400/{uuid.uuid4().hex[:6]}"
    submit_and_wait(stack, Txt2ImgJob(prompt="bad hook", webhook_url=receiver.url(client_error), **SMALL))
    receiver.wait_for(client_error, 1)
    time.sleep(1.5)
    assert len(receiver.wait_for(client_error, 1)) == 1, "a 4xx answer is final"
    assert len(attempts) == 5


def test_callback_task_gets_the_result(stack: Stack, callbacks: list[dict[str, Any]]) -> None:
    handle = stack.queue.submit(
        Txt2ImgJob(
            prompt="called back", callback_task="webapp.job_done", callback_queue=CALLBACK_QUEUE, **SMALL
        )
    )
    result = handle.wait(timeout=120)
    call = wait_callback(callbacks, handle.job_id)
    assert call["state"] == "succeeded" and call["error"] is None
    assert call["result"]["manifest_url"] == result.manifest_url


def test_failed_job_notifies_both_channels_with_its_error(
    stack: Stack, receiver: Receiver, callbacks: list[dict[str, Any]]
) -> None:
    path = f"/ok/{uuid.uuid4().hex[:6]}"
    handle = stack.queue.submit(
        {
            "mode": "img2img",
            "prompt": "x",
            "image_url": "s3://inputs/notify/none.png",
            "steps": 4,
            "strength": 0.5,
            "webhook_url": receiver.url(path),
            "callback_task": "webapp.job_done",
            "callback_queue": CALLBACK_QUEUE,
            **SMALL,
        }
    )
    data = data_of(receiver.wait_for(path, 1)[0])
    assert data["state"] == "failed" and data["error"]["type"] == "InputImageError"
    assert "no such object" in data["error"]["message"]
    call = wait_callback(callbacks, handle.job_id)
    assert call["state"] == "failed" and call["error"] == data["error"]


def test_cancelled_job_notifies_cancelled(stack: Stack, receiver: Receiver) -> None:
    path = f"/ok/{uuid.uuid4().hex[:6]}"
    handle = stack.queue.submit(
        Txt2ImgJob(prompt="long", webhook_url=receiver.url(path), width=64, height=64, steps=150)
    )
    deadline = time.monotonic() + 60
    while not handle.progress() and time.monotonic() < deadline:
        time.sleep(0.05)
    handle.cancel()
    data = data_of(receiver.wait_for(path, 1)[0])
    assert data["state"] == "cancelled" and data["error"]["type"] == "JobCancelled"


def test_hosts_off_the_allow_list_are_refused_at_submit_and_in_the_worker(stack: Stack) -> None:
    with pytest.raises(JobValidationError, match="not allowed for webhooks"):
        stack.queue.submit(Txt2ImgJob(prompt="x", webhook_url="http://169.254.169.254/latest", **SMALL))
    assert stack.queue.validate(Txt2ImgJob(prompt="x", webhook_url="https://hooks.example.com/in", **SMALL))
    raw = stack.queue.celery.send_task(
        TXT2IMG_TASK,
        queue="sdqueue.interactive",
        kwargs={"prompt": "x", "webhook_url": "http://127.0.0.2:9/steal", **SMALL},
    )
    raw.get(timeout=60, propagate=False)
    assert raw.state == "FAILURE" and "not allowed for webhooks" in str(raw.result)


def test_a_tampered_or_stale_webhook_fails_verification(stack: Stack, receiver: Receiver) -> None:
    path = f"/ok/{uuid.uuid4().hex[:6]}"
    submit_and_wait(stack, Txt2ImgJob(prompt="verify me", webhook_url=receiver.url(path), **SMALL))
    request = receiver.wait_for(path, 1)[0]
    verify(SECRET, request["headers"], request["body"])
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify(SECRET, request["headers"], request["body"].replace(b"succeeded", b"failed"))
    with pytest.raises(WebhookSignatureError, match="tolerance"):
        verify(SECRET, request["headers"], request["body"], now=time.time() + 3600)
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify("whsec_" + base64.b64encode(b"another secret").decode(), request["headers"], request["body"])


def test_a_pending_retry_survives_a_notifier_kill(stack: Stack, receiver: Receiver) -> None:
    """The retry waits in Redis as a message: the receiver answers 503 with Retry-After: 4, the
    notifier is killed during those 4 s, a new one starts, and the webhook still arrives, same id."""
    path = f"/retry-after/4/{uuid.uuid4().hex[:6]}"
    submit_and_wait(stack, Txt2ImgJob(prompt="survivor", webhook_url=receiver.url(path), **SMALL))
    first = receiver.wait_for(path, 1)[0]
    time.sleep(0.5)
    assert stack.notifier is not None and len(receiver.wait_for(path, 1)) == 1
    stack.notifier.kill()
    killed_at = time.monotonic()
    stack.notifier.start()
    attempts = receiver.wait_for(path, 2, timeout=90)
    print(
        f"webhook retry delivered {attempts[1]['at'] - killed_at:.1f}s after the notifier was killed, "
        f"{attempts[1]['at'] - first['at']:.1f}s after the first attempt "
        "(Retry-After 4s, visibility timeout 5s)"
    )
    assert attempts[1]["at"] > killed_at and attempts[1]["at"] - first["at"] >= 4
    assert attempts[1]["headers"]["webhook-id"] == first["headers"]["webhook-id"]
    verify(SECRET, attempts[1]["headers"], attempts[1]["body"])


def _latencies(stack: Stack, count: int, webhook: str | None) -> list[float]:
    took = []
    for index in range(count):
        began = time.monotonic()
        job = Txt2ImgJob(prompt=f"latency {index}", webhook_url=webhook, **SMALL)
        stack.queue.submit(job).wait(timeout=120)
        took.append(time.monotonic() - began)
    return took


def test_a_slow_webhook_receiver_does_not_delay_gpu_jobs(stack: Stack, receiver: Receiver) -> None:
    """A receiver taking 5 s an attempt: jobs back to back take as long as without webhooks,
    because the notifier (not the GPU worker, which does not consume sdqueue.notify) waits on it."""
    assert stack.worker is not None and stack.notifier is not None
    inspect = stack.queue.celery.control.inspect(timeout=5)
    queues = {host: [q["name"] for q in qs] for host, qs in (inspect.active_queues() or {}).items()}
    assert queues[stack.worker.hostname] == ["sdqueue.interactive", "sdqueue.bulk"]
    assert queues[stack.notifier.hostname] == ["sdqueue.notify"]
    count = 4
    _latencies(stack, 1, None)  # warm
    baseline = _latencies(stack, count, None)
    path = f"/slow/5/{uuid.uuid4().hex[:6]}"
    began = time.monotonic()
    slow = _latencies(stack, count, receiver.url(path))
    jobs_done = time.monotonic() - began
    hits = receiver.wait_for(path, count, timeout=60)
    print(
        f"job latency (submit -> result, 64x64, 2 steps, CPU) without webhooks: "
        f"{[round(t, 2) for t in baseline]}s; with a 5 s webhook receiver: {[round(t, 2) for t in slow]}s; "
        f"{count} jobs done in {jobs_done:.1f}s, their webhooks arrived by "
        f"{max(h['at'] for h in hits) - began:.1f}s"
    )
    assert sorted(slow)[count // 2] < sorted(baseline)[count // 2] + 1.0
    assert jobs_done < 5.0 * (count - 1), "jobs must not wait for the receiver"


def test_the_notifier_warns_about_an_unknown_setting_at_start(logdir: Path, stack: Stack) -> None:
    """Same start-up path as the worker (WorkerSettings built as the Celery app is imported)."""
    env = {**stack.env, "SDQ_WEBHOOK_MAX_ATEMPTS": "3"}
    notifier = NotifierProcess(logdir, env, name="notifier-typo").start()
    try:
        assert (
            "unknown setting SDQ_WEBHOOK_MAX_ATEMPTS is ignored; did you mean SDQ_WEBHOOK_MAX_ATTEMPTS?"
            in (notifier.tail(200))
        )
    finally:
        notifier.stop()
