"""A hostile-input corpus against the shared worker, sent the way an outside client would: plain
``send_task``, hand-built protocol-1 and protocol-2 messages pushed with redis-py, Celery's own
``revoke`` and Flower's HTTP API. Every message must end with a final result within seconds, with
a message that says what to fix; nothing may escape the output prefix, run twice, publish tasks
of the sender's choosing, or hold the only job slot. Then the start-up refusals: an evicting or
volatile Redis, an unwritable ready file, a missing output bucket."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery.result import AsyncResult
from PIL import Image

from devstack.services import RedisServer, WorkerProcess, stack_env, wait_for
from sdqueue import Img2ImgJob, JobValidationError, SdQueue, Txt2ImgJob
from sdqueue.names import IMG2IMG_TASK, TXT2IMG_TASK, deliveries_key
from tests.helpers import start_flower, wait_cancelled_by_worker

SMALL = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 2}
INTERACTIVE = "sdqueue.interactive"
ANSWER_S = 60.0
"""Generous bound for a loaded 2-core machine; a refusal takes well under a second when idle."""


def push_raw(queue: SdQueue, body: bytes, headers: dict[str, Any], correlation_id: str | None) -> None:
    """LPUSH a kombu envelope around raw body bytes (no encoder in the way)."""
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": correlation_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": INTERACTIVE, "routing_key": INTERACTIVE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    queue.redis.lpush(INTERACTIVE, json.dumps(envelope))


def proto2(queue: SdQueue, task: str, job_id: str, body: bytes) -> None:
    headers = {"lang": "py", "task": task, "id": job_id, "root_id": job_id, "retries": 0, "argsrepr": ""}
    push_raw(queue, body, headers, job_id)


def proto1(queue: SdQueue, task: str, job_id: str, kwargs_text: str) -> None:
    body = f'{{"task": "{task}", "id": "{job_id}", "args": [], "kwargs": {kwargs_text}, "retries": 0}}'
    push_raw(queue, body.encode(), {}, None)


def new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def wait_final(queue: SdQueue, job_id: str, timeout: float = ANSWER_S) -> AsyncResult:
    result = AsyncResult(job_id, app=queue.celery)
    deadline = time.monotonic() + timeout
    while result.state not in ("SUCCESS", "FAILURE", "REVOKED") and time.monotonic() < deadline:
        time.sleep(0.1)
    return result


def meta(queue: SdQueue, job_id: str) -> dict[str, Any]:
    raw = queue.redis.get(f"celery-task-meta-{job_id}")
    assert raw is not None, f"no result entry for {job_id[:60]}"
    body: dict[str, Any] = json.loads(raw)
    return body


def good_job_still_runs(queue: SdQueue) -> None:
    assert queue.submit(Txt2ImgJob(**SMALL)).wait(timeout=120).images


def keys_with(s3: Any, text: str) -> list[str]:
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="sdqueue"):
        found += [item["Key"] for item in page.get("Contents", []) if text in item["Key"]]
    return found


# --- the corpus: each message must end FAILED, once, fast, with a reason ---------------------------


def corpus(queue: SdQueue) -> list[tuple[str, str, str]]:
    """Send every hostile message at once; returns (case, job id, text the reason must contain)."""
    sent: list[tuple[str, str, str]] = []

    def task(case: str, job_id: str, hint: str, name: str = TXT2IMG_TASK, **options: Any) -> None:
        queue.celery.send_task(name, task_id=job_id, queue=INTERACTIVE, **options)
        sent.append((case, job_id, hint))

    for case, job_id in [
        ("id escaping the prefix", "../../escaped-" + uuid.uuid4().hex[:6]),
        ("id with a slash", "victim/" + uuid.uuid4().hex[:6]),
        ("10 KB id", "k" * 10_000 + uuid.uuid4().hex[:6]),
        ("id with a newline", "new\nline-" + uuid.uuid4().hex[:6]),
        ("non-ASCII id", "naïve-" + uuid.uuid4().hex[:6]),
    ]:
        task(case, job_id, "task id", kwargs=SMALL)
    for case, prefix in [("prefix with dot segments", "./outputs/./"), ("prefix escaping", "../inputs")]:
        task(
            case,
            new_id("prefix"),
            "prefix",
            kwargs={**SMALL, "output": {"bucket": "sdqueue", "prefix": prefix}},
        )
    task(
        "fragment in the input URL",
        new_id("frag"),
        "queries and fragments",
        IMG2IMG_TASK,
        kwargs={**SMALL, "image_url": "s3://sdqueue/inputs/a#b.png", "steps": 4, "strength": 0.5},
    )
    task(
        "port out of range",
        new_id("port"),
        "image_url",
        IMG2IMG_TASK,
        kwargs={**SMALL, "image_url": "http://127.0.0.1:99999/sdqueue/a.png", "steps": 4, "strength": 0.5},
    )
    task("guidance as a string", new_id("str"), "guidance_scale", kwargs={**SMALL, "guidance_scale": "7.5"})
    task(
        "strength as a boolean",
        new_id("bool"),
        "strength",
        IMG2IMG_TASK,
        kwargs={**SMALL, "image_url": "s3://sdqueue/a.png", "strength": True},
    )
    task("positional args", new_id("args"), "keyword arguments", args=["a harbour"])
    task("mode disagreeing with the task", new_id("mode"), "mode", kwargs={**SMALL, "mode": "img2img"})
    task(
        "callback off the allow-list",
        new_id("cb"),
        "callback_task",
        kwargs={**SMALL, "callback_task": "victim.task", "callback_queue": "victim.queue"},
    )
    task(
        "webhook into Redis",
        new_id("hook"),
        "own Redis",
        kwargs={
            **SMALL,
            "webhook_url": f"http://127.0.0.1:{queue.redis.connection_pool.connection_kwargs['port']}/",
        },
    )
    task(
        "Celery built-in chord_unlock",
        new_id("chord"),
        "does not run on sdqueue's GPU worker",
        "celery.chord_unlock",
        args=["group-id", {"task": "victim.task"}],
        kwargs={"interval": 0.5},
    )
    task(
        "Celery built-in backend_cleanup",
        new_id("cleanup"),
        "does not run on sdqueue's GPU worker",
        "celery.backend_cleanup",
    )
    task("unknown task name", new_id("unknown"), "is not an sdqueue task", "sdqueue.delete_everything")

    links = new_id("links")
    link = {
        "task": "victim.task",
        "args": [],
        "kwargs": {},
        "options": {"queue": "victim.queue"},
        "subtask_type": None,
    }
    embed = {"callbacks": [link], "errbacks": None, "chain": None, "chord": None}
    proto2(queue, TXT2IMG_TASK, links, json.dumps([[], SMALL, embed]).encode())
    sent.append(("linked task in embed", links, "linked tasks"))

    digits = "9" * 5000
    for case, job_id, body in [
        (
            "protocol 2, a 5,000-digit integer",
            new_id("p2int"),
            f'[[], {{"prompt": "x", "seed": {digits}}}, {{}}]',
        ),
        (
            "protocol 2, 100,000-deep nesting",
            new_id("p2deep"),
            "[[], {}, " + "[" * 100_000 + "]" * 100_000 + "]",
        ),
    ]:
        proto2(queue, TXT2IMG_TASK, job_id, body.encode())
        sent.append((case, job_id, "could not be decoded"))
    for case, job_id, kwargs_text in [
        ("protocol 1, a 5,000-digit integer", new_id("p1int"), f'{{"prompt": "x", "seed": {digits}}}'),
        (
            "protocol 1, 100,000-deep nesting",
            new_id("p1deep"),
            '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
        ),
    ]:
        proto1(queue, TXT2IMG_TASK, job_id, kwargs_text)
        sent.append((case, job_id, "could not be decoded"))
    return sent


@pytest.mark.usefixtures("worker")
def test_every_hostile_message_ends_failed_once_with_a_reason(
    queue: SdQueue, s3: Any, worker: WorkerProcess
) -> None:
    began = time.monotonic()
    sent = corpus(queue)
    slow = []
    for case, job_id, hint in sent:
        result = wait_final(queue, job_id)
        assert result.state == "FAILURE", (case, result.state)
        reason = " ".join(str(part) for part in meta(queue, job_id)["result"]["exc_message"])
        assert hint in reason, (case, reason[:300])
        assert len(reason) < 2500, (case, len(reason))
        assert meta(queue, job_id)["traceback"] is None, f"{case}: a server traceback reached the client"
        assert not queue.redis.exists(deliveries_key(job_id, 0)), f"{case}: it counted as a run"
        slow.append(time.monotonic() - began)
    time.sleep(2)  # a retried built-in (chord_unlock every 0.5 s) would show up here
    log = worker.log_path.read_text(errors="replace")
    for case, job_id, _ in sent:
        assert AsyncResult(job_id, app=queue.celery).state == "FAILURE", case
    chord = next(job_id for case, job_id, _ in sent if "chord_unlock" in case)
    assert log.count(f"refused message {chord}") == 1, "a built-in must be answered once, never retried"
    assert queue.redis.llen("victim.queue") == 0, "a refused message made the worker publish a task"
    assert not keys_with(s3, "escaped") and not keys_with(s3, "victim/"), "a write escaped its folder"
    good_job_still_runs(queue)
    print(
        f"{len(sent)} hostile messages: all FAILED with a reason, the last after {max(slow):.1f}s; "
        "none ran, none retried, nothing written outside its folder; worker still serving"
    )


@pytest.mark.usefixtures("worker")
def test_refused_payloads_are_stored_and_logged_capped(queue: SdQueue, worker: WorkerProcess) -> None:
    since = len(worker.log_path.read_bytes())
    big_prompt, many_kwargs = new_id("bigprompt"), new_id("manykw")
    queue.celery.send_task(
        TXT2IMG_TASK, task_id=big_prompt, queue=INTERACTIVE, kwargs={**SMALL, "prompt": "p" * 2_000_000}
    )
    queue.celery.send_task(
        TXT2IMG_TASK,
        task_id=many_kwargs,
        queue=INTERACTIVE,
        kwargs={**SMALL, **{f"k{i}": i for i in range(10_000)}},
    )
    sizes = {}
    for job_id in (big_prompt, many_kwargs):
        assert wait_final(queue, job_id).state == "FAILURE"
        sizes[job_id] = len(queue.redis.get(f"celery-task-meta-{job_id}") or b"")
    grown = len(worker.log_path.read_bytes()) - since
    print(
        f"2 MB prompt -> {sizes[big_prompt]} B result entry; 10,000 kwargs -> {sizes[many_kwargs]} B; "
        f"log grew {grown} B"
    )
    assert max(sizes.values()) < 8192, sizes
    assert grown < 64 * 1024, f"the log grew {grown} bytes for two refusals"


def many_scan_jpeg(scans: int, size: int = 2048) -> bytes:
    """A progressive JPEG whose shortest scan (a few bytes of EOB runs over every block) is repeated
    until the file has ``scans`` scans: each one makes the decoder walk the whole image again."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[::7] = 200
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", progressive=True, quality=20)
    data = buffer.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    ends = [*starts[1:], len(data) - 2]
    shortest = min(range(len(starts)), key=lambda k: ends[k] - starts[k])
    scan = data[starts[shortest] : ends[shortest]]
    return data[: ends[shortest]] + scan * (scans - len(starts)) + data[ends[shortest] :]


@pytest.mark.usefixtures("worker")
def test_a_slow_to_decode_jpeg_is_refused_at_once(queue: SdQueue, s3: Any) -> None:
    """60,000 progressive scans: decoding it took 28 s of the only job slot; now refused from its
    markers before any pixel is decoded."""
    data = many_scan_jpeg(60_000)
    key = f"slow/{uuid.uuid4().hex[:8]}.jpg"
    s3.put_object(Bucket="inputs", Key=key, Body=data)
    began = time.monotonic()
    handle = queue.submit(Img2ImgJob(**{**SMALL, "steps": 4}, image_url=f"s3://inputs/{key}", strength=0.5))
    with pytest.raises(Exception, match="60000 scans"):
        handle.wait(timeout=120)
    took = time.monotonic() - began
    print(f"{len(data) / 1e6:.1f} MB JPEG with 60,000 scans refused in {took:.1f}s")
    assert took < 30
    good_job_still_runs(queue)


def test_submit_refuses_callbacks_off_the_allow_list(queue: SdQueue) -> None:
    with pytest.raises(JobValidationError, match="belong to sdqueue itself"):
        queue.submit({"mode": "txt2img", **SMALL, "callback_task": "sdqueue.txt2img"})
    with pytest.raises(JobValidationError, match="callback_task 'webapp.done' is not allowed"):
        queue.submit(Txt2ImgJob(**SMALL, callback_task="webapp.done"))


@pytest.mark.usefixtures("worker")
def test_output_prefix_is_a_sub_folder_of_the_configured_one(queue: SdQueue) -> None:
    result = queue.submit(Txt2ImgJob(**SMALL, output={"bucket": "sdqueue", "prefix": "team/a"})).wait(
        timeout=120
    )
    assert result.images[0].key.startswith(f"outputs/team/a/{result.job_id}/"), result.images[0].key


# --- cancel from any client: Celery's revoke, Flower's button ---------------------------------------


def long_job(queue: SdQueue) -> Any:
    handle = queue.submit(Txt2ImgJob(prompt="long", width=64, height=64, steps=150))
    wait_for(lambda: handle.progress() is not None, 120, "progress of the long job")
    return handle


def stopped_early(queue: SdQueue, handle: Any) -> int:
    """Wait for the job to end cancelled by the worker (its own reason, not only Celery's
    "terminated"); returns the last step it reached."""
    wait_cancelled_by_worker(queue, handle.job_id, 120)
    assert handle.state() == "cancelled"
    step = int((handle.progress() or {}).get("step", 0))
    assert step < 150, "the job ran on to its last step"
    return step


@pytest.mark.usefixtures("worker")
def test_celery_revoke_and_flowers_terminate_cancel_jobs(
    queue: SdQueue, env: dict[str, str], logdir: Path
) -> None:
    running = long_job(queue)
    queued = queue.submit(Txt2ImgJob(**SMALL))
    queue.celery.control.revoke(queued.job_id)
    queue.celery.control.revoke(running.job_id)  # plain revoke of a running job: stops at its next step
    step = stopped_early(queue, running)
    assert wait_final(queue, queued.job_id).state in ("REVOKED", "FAILURE")
    assert queued.state() == "cancelled" and not queue.redis.exists(deliveries_key(queued.job_id, 0))
    queued_meta = meta(queue, queued.job_id)  # Celery skips the revoked message; the reason is ours
    assert queued_meta["status"] == "REVOKED", queued_meta
    assert queued_meta["result"]["exc_message"][0] == "cancelled before it started", queued_meta
    reason = meta(queue, running.job_id)["result"]["exc_message"][0]
    assert reason.startswith("cancelled while running"), reason
    # Celery's revoke command itself stores REVOKED for a job the worker has not received yet (the
    # race the queued job above may or may not hit): the reason is sdqueue's there too
    ahead = uuid.uuid4().hex
    queue.celery.control.revoke(ahead)
    assert wait_final(queue, ahead).state == "REVOKED"
    assert meta(queue, ahead)["result"]["exc_message"] == ["cancelled before it started"]
    flower, port = start_flower(env, logdir, "--basic-auth=ops:secret")
    try:
        terminated = long_job(queue)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/task/revoke/{terminated.job_id}?terminate=true",
            method="POST",
            data=b"",
            headers={"Authorization": "Basic " + base64.b64encode(b"ops:secret").decode()},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        flower_step = stopped_early(queue, terminated)
    finally:
        flower.terminate()
        flower.wait(30)
    good_job_still_runs(queue)
    print(
        f"revoke(id) stopped a running job at step {step}/150 and a queued one before it ran; "
        f"Flower's terminate stopped one at step {flower_step}/150"
    )


# --- start-up refusals ---------------------------------------------------------------------------


def test_the_worker_refuses_to_start_where_it_would_lose_jobs(
    logdir: Path, env: dict[str, str], redis_server: RedisServer, moto: Any, tiny_model: str
) -> None:
    evicting = RedisServer(logdir).start()
    try:
        import redis as redis_py

        redis_py.Redis.from_url(evicting.url).config_set("maxmemory-policy", "allkeys-lru")
        cases = {
            "evicting": (stack_env(evicting.url, moto.url, tiny_model), "maxmemory-policy noeviction"),
            "volatile": (
                stack_env(redis_server.url, moto.url, tiny_model, accept_volatile_broker="false"),
                "SDQ_ACCEPT_VOLATILE_BROKER=true",
            ),
            "no-bucket": (
                stack_env(redis_server.url, moto.url, tiny_model, output_bucket="no-such-bucket"),
                "bucket 'no-such-bucket' does not exist",
            ),
            "ready-file": (stack_env(redis_server.url, moto.url, tiny_model), "SDQ_READY_FILE"),
        }
        workers = {}
        for name, (case_env, _) in cases.items():
            process = WorkerProcess(logdir, case_env, name=f"refuse-{name}")
            if name == "ready-file":
                process.env["SDQ_READY_FILE"] = "/proc/no-such-dir/ready"
            workers[name] = process.start(wait=False)
        for name, process in workers.items():
            wait_for(lambda p=process: not p.alive(), 120, f"worker {name} to exit")  # type: ignore[misc]
            assert process.proc is not None and process.proc.returncode != 0, name
            text = process.log_path.read_text(errors="replace")
            assert "the worker cannot start" in text and cases[name][1] in text, (name, process.tail())
            assert "Traceback" not in text, f"{name}: an expected refusal printed a traceback"
    finally:
        evicting.stop()
