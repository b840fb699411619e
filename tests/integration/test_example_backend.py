"""The example FastAPI backend (examples/fastapi_app.py) driven through starlette's TestClient,
against the real Redis, moto S3 and worker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from examples.fastapi_app import create_app
from sdqueue.client import SdQueue
from sdqueue.webhooks import signed_headers
from tests.helpers import assert_no_outputs, assert_progress_stopped, wait_cancelled_by_worker

SECRET = "example-backend-secret"
pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def client(queue: SdQueue) -> Iterator[TestClient]:
    with TestClient(create_app(queue, webhook_secret=SECRET)) as test_client:
        yield test_client


def poll(
    client: TestClient, job_id: str, until: tuple[str, ...], timeout: float = 120
) -> list[dict[str, Any]]:
    """GET the job every 50 ms until its state is one of ``until``; returns every answer."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        seen.append(response.json())
        if seen[-1]["state"] in until:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {seen[-1]['state']} after {timeout}s")


def test_submit_poll_progress_and_fetch_the_pngs(client: TestClient) -> None:
    response = client.post(
        "/jobs",
        json={
            "mode": "txt2img",
            "prompt": "a backend fox",
            "width": 64,
            "height": 64,
            "steps": 40,
            "num_images": 2,
            "seed": 9,
        },
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    answers = poll(client, job_id, ("succeeded", "failed", "cancelled"))
    steps = sorted({answer["progress"]["step"] for answer in answers if answer["progress"]})
    print(f"{len(answers)} polls; progress steps seen: {steps}")
    final = answers[-1]
    assert final["state"] == "succeeded", final
    assert final["progress"]["step"] == final["progress"]["total"] == 40
    assert len(steps) >= 2, "progress must be visible while the job runs"
    assert [image["seed"] for image in final["images"]] == [9, 10]
    for image in final["images"]:
        fetched = httpx.get(image["url"], timeout=10)
        assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_delete_cancels_a_running_job(client: TestClient, queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    job_id = client.post(
        "/jobs", json={"mode": "txt2img", "prompt": "long", "width": 64, "height": 64, "steps": 150}
    ).json()["job_id"]
    running = poll(client, job_id, ("running",))[-1]
    deadline = time.monotonic() + 60
    while not running["progress"] and time.monotonic() < deadline:
        running = client.get(f"/jobs/{job_id}").json()
        time.sleep(0.05)
    assert running["progress"], "the job never reported progress"
    assert client.delete(f"/jobs/{job_id}").status_code == 202
    # What the worker did, not the client-side cancel key the backend also reads.
    wait_cancelled_by_worker(queue, job_id)
    step = assert_progress_stopped(queue, job_id, total=150)
    assert_no_outputs(s3, job_id)
    final = poll(client, job_id, ("cancelled", "succeeded", "failed"))[-1]
    print(f"running at {running['progress']}; the worker stopped it at step {step}/150")
    assert running["state"] == "running" and final["state"] == "cancelled"
    assert "images" not in final


def test_bad_specs_and_unknown_jobs_get_http_errors(client: TestClient) -> None:
    response = client.post("/jobs", json={"mode": "txt2img", "prompt": "x", "steps": 0})
    assert response.status_code == 422 and "steps" in response.json()["detail"]
    assert (
        client.post(
            "/jobs", json={"mode": "txt2img", "prompt": "x", "webhook_url": "http://10.1.2.3/in"}
        ).status_code
        == 422
    )
    assert client.get("/jobs/never-submitted-here").status_code == 404
    assert client.delete("/jobs/not%20an%20id").json()["detail"] == "no job not an id"


def test_webhook_endpoint_accepts_signed_bodies_only(client: TestClient) -> None:
    body = json.dumps({"type": "job.succeeded", "data": {"job_id": "j1", "state": "succeeded"}}).encode()
    headers = signed_headers(SECRET, "msg_test", body)
    assert client.post("/webhooks/sdqueue", content=body, headers=headers).status_code == 204
    assert client.app.state.notifications[-1]["data"]["job_id"] == "j1"  # type: ignore[attr-defined]
    tampered = body.replace(b"succeeded", b"cancelled")
    assert client.post("/webhooks/sdqueue", content=tampered, headers=headers).status_code == 400
    assert client.post("/webhooks/sdqueue", content=body).status_code == 400
