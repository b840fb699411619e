"""Flower, as an operator sees it: a real ``celery -A sdqueue.app flower`` process watching the
test stack, its pages rendered by headless Chromium while a job runs, after it is cancelled (the
REVOKED badge, with the reason) and for a job published as a raw message without argument
reprs (its kwargs shown). Screenshots are kept in test-artifacts/ (gitignored)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from devstack.services import ROOT, WorkerProcess, wait_for
from sdqueue import JobCancelled, SdQueue, Txt2ImgJob
from sdqueue.client import JobHandle
from sdqueue.names import TXT2IMG_TASK
from tests.helpers import revoked_reason, start_flower, wait_cancelled_by_worker

ARTIFACTS = ROOT / "test-artifacts"
LONG = {"width": 256, "height": 256, "steps": 150}  # about a minute on a CPU core: rendered mid-job
TASKS_COLUMNS = "name,uuid,state,result,received,started,runtime,worker"
"""As docker/compose.yaml and infra/ run Flower: the Result column carries a running job's progress."""
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=4000",
    "--window-size=1400,1000",
]


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise RuntimeError("chromium not found: run `make browser` (apt-get install chromium)")
    return binary


def render(url: str, screenshot: Path | None = None) -> str:
    """The page's HTML after its scripts ran (``--dump-dom``), and a PNG when asked."""
    with tempfile.TemporaryDirectory(prefix="sdq-chromium-") as profile:
        base = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        if screenshot is not None:
            subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
        out = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    if screenshot is not None:
        screenshot.with_suffix(".html").write_text(out.stdout)
    return out.stdout


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def flower(env: dict[str, str], worker: WorkerProcess, logdir: Path) -> Iterator[str]:
    proc, port = start_flower(
        {**env, "FLOWER_UNAUTHENTICATED_API": "true"},  # loopback only; the pages need no auth then
        logdir,
        f"--tasks_columns={TASKS_COLUMNS}",
        log_name="flower-ui.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(f"{url}/healthcheck"), 60, "flower")
        wait_for(
            lambda: worker.hostname in get_json(f"{url}/api/workers?refresh=1"),
            60,
            "flower seeing the worker",
        )
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def started_tasks(flower: str) -> dict[str, Any]:
    """What Flower's "Started" filter button asks for (search ``state:STARTED``)."""
    query = {
        "draw": "1",
        "start": "0",
        "length": "50",
        "search[value]": "state:STARTED",
        "order[0][column]": "0",
        "order[0][dir]": "desc",
        "columns[0][data]": "received",
    }
    rows = get_json(f"{flower}/tasks/datatable?{urllib.parse.urlencode(query)}")["data"]
    return {row["uuid"]: row for row in rows}


def wait_running(flower: str, handle: JobHandle, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = started_tasks(flower).get(handle.job_id)
        if row and str(row.get("result", "")).startswith("step "):
            return row
        time.sleep(0.2)
    raise AssertionError(f"flower never listed {handle.job_id} as STARTED with progress: {handle.state()}")


def test_flower_shows_progress_of_a_running_job_and_why_it_was_cancelled(flower: str, queue: SdQueue) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    handle = queue.submit(Txt2ImgJob(prompt="watched in flower", **LONG))
    try:
        row = wait_running(flower, handle)
        assert row["state"] == "STARTED" and re.fullmatch(r"step \d+/150", row["result"])
        page = render(f"{flower}/task/{handle.job_id}", ARTIFACTS / "flower-task-running.png")
        listing = render(f"{flower}/tasks?state=STARTED", ARTIFACTS / "flower-tasks-started.png")
        assert handle.state() == "running", "the job must still run while the pages are rendered"
    finally:
        handle.cancel()
    shown = re.findall(r"step (\d+)/150", page)
    listed = re.findall(r"step \d+/150", listing)
    print(f"task page shows step {shown} of 150; the Started list shows {listed}")
    assert shown and 0 < int(shown[0]) <= 150
    assert "STARTED" in page
    assert handle.job_id in listing and listed, "the Started filter lists the job with its progress"
    meta = wait_cancelled_by_worker(queue, handle.job_id, 60)
    assert handle.state() == "cancelled"
    reason = revoked_reason(meta)

    def revoked_with_reason() -> bool:
        task = get_json(f"{flower}/api/task/info/{handle.job_id}")
        return task.get("state") == "REVOKED" and task.get("result") == f"cancelled: {reason}"

    wait_for(revoked_with_reason, 30, "flower showing the job REVOKED with the cancel reason")
    cancelled = render(f"{flower}/task/{handle.job_id}", ARTIFACTS / "flower-task-cancelled.png")
    assert status_badge(cancelled) == ("text-bg-secondary", "REVOKED"), cancelled[-3000:]
    assert re.search(r"cancelled: cancelled while running, at step \d+/150", cancelled), cancelled[-3000:]
    listing = render(f"{flower}/tasks", ARTIFACTS / "flower-tasks-cancelled.png")
    assert row_badge(listing, handle.job_id) == ("text-bg-secondary", "REVOKED"), listing[-3000:]
    with pytest.raises(JobCancelled) as raised:
        handle.wait(timeout=10)
    assert raised.value.reason == reason and reason.startswith("cancelled while running, at step ")
    print(f"flower shows the cancelled job REVOKED (grey badge), result 'cancelled: {reason}'")


def status_badge(page: str) -> tuple[str, str] | None:
    """(class, text) of the Status badge on Flower's task page."""
    found = re.search(r'<dt>Status</dt>\s*<dd>\s*<span class="badge ([^"]+)">([^<]+)</span>', page)
    return (found.group(1), found.group(2)) if found else None


def row_badge(listing: str, job_id: str) -> tuple[str, str] | None:
    """(class, text) of the state badge in the task list's row of ``job_id``."""
    for row in re.findall(r"<tr[^>]*>.*?</tr>", listing, flags=re.S):
        found = re.search(r'<span class="badge ([^"]+)">([^<]+)</span>', row) if job_id in row else None
        if found:
            return found.group(1), found.group(2)
    return None


def push_raw_job(queue: SdQueue, job_id: str, kwargs: dict[str, Any]) -> None:
    """A protocol-2 message as a non-Python client writes it: no ``argsrepr``/``kwargsrepr``."""
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    envelope = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "js", "task": TXT2IMG_TASK, "id": job_id, "root_id": job_id, "retries": 0},
        "properties": {
            "correlation_id": job_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "sdqueue.interactive"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    queue.redis.lpush("sdqueue.interactive", json.dumps(envelope))


def test_flower_shows_the_kwargs_of_a_job_sent_without_argument_reprs(flower: str, queue: SdQueue) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    good, secret = f"raw-{uuid.uuid4().hex[:10]}", f"raw-secret-{uuid.uuid4().hex[:8]}"
    push_raw_job(queue, good, {"prompt": "a raw lighthouse in flower", "width": 64, "height": 64, "steps": 2})
    push_raw_job(
        queue, secret, {"prompt": "with a password", "webhook_url": "https://ops:hunter2@hooks.invalid/x"}
    )
    assert AsyncResult(good, app=queue.celery).get(timeout=120)["images"]  # no submit record: not .wait()
    refused = AsyncResult(secret, app=queue.celery)
    refused.get(timeout=60, propagate=False)
    assert refused.state == "FAILURE"  # hooks.invalid is on no webhook allow-list
    wait_for(
        lambda: "raw lighthouse" in str(get_json(f"{flower}/api/task/info/{good}").get("kwargs")),
        30,
        "kwargs",
    )
    page = render(f"{flower}/task/{good}", ARTIFACTS / "flower-task-raw-message.png")
    shown = re.search(r"<dt>Keyword arguments</dt>\s*<dd><pre[^>]*><code>([^<]*)</code>", page)
    assert shown and "a raw lighthouse in flower" in shown.group(1), page[-3000:]
    assert status_badge(page) == ("text-bg-success", "SUCCESS")
    masked = str(get_json(f"{flower}/api/task/info/{secret}").get("kwargs"))
    assert "hunter2" not in masked and "ops:***@hooks.invalid" in masked, masked
    print(f"flower's task page shows the raw message's kwargs: {shown.group(1)}")
