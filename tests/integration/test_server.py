"""``sdqueue serve`` as a real process against the real stack: native API, SSE, uploads, two tenants,
quotas, and the official ``openai`` package as the client."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import struct
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
from PIL import Image

from devstack.server import ServerProcess
from devstack.services import MotoServer, RedisServer, WorkerProcess
from sdqueue.server.keys import hash_key
from sdqueue.server.quotas import Refusal
from tests.helpers import ROOT, own_stack, png_bytes, smooth_image

KEYS = {"alice": "sdq_alice_secret", "bob": "sdq_bob_secret", "carol": "sdq_carol_secret"}
CHROMIUM = "/usr/bin/chromium"  # Debian's package (make browser); never playwright's own download
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
JOB = {"mode": "txt2img", "prompt": "a red fox", "width": 64, "height": 64, "steps": 3}


def _key_file(path: Path, limits: dict[str, dict[str, object]]) -> Path:
    entries = [{"name": n, "sha256": hash_key(k), **limits.get(n, {})} for n, k in KEYS.items()]
    path.write_text(json.dumps(entries))
    return path


def _client(server: ServerProcess, tenant: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def server(
    logdir: Path, env: dict[str, str], worker: WorkerProcess, moto: MotoServer
) -> Iterator[ServerProcess]:
    """Keys for alice and bob, carol bound to the bulk lane; presigned URLs on a 'public' host name."""
    keys = _key_file(logdir / "keys.json", {"carol": {"lane": "bulk"}})
    public = moto.url.replace("127.0.0.1", "localhost")
    process = ServerProcess(
        logdir, {**env, "SDQ_API_KEYS_FILE": str(keys), "SDQ_S3_PUBLIC_ENDPOINT_URL": public}
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def idle(logdir: Path, moto: MotoServer, tiny_model: str) -> Iterator[ServerProcess]:
    """A server on a Redis without a worker: jobs stay queued (quotas, bad input, schemathesis)."""
    limits = {"alice": {"max_concurrent": 2, "rate_per_minute": 60000}, "bob": {"rate_per_minute": 6}}
    with own_stack(
        logdir, moto.url, tiny_model, "idle", with_worker=False, rate_burst=3, sync_timeout_s=1
    ) as st:
        keys = _key_file(logdir / "idle-keys.json", limits)
        process = ServerProcess(
            logdir, {**st.env, "SDQ_API_KEYS_FILE": str(keys)}, name="idle-server"
        ).start()
        try:
            yield process
        finally:
            process.stop()


def _events(client: httpx.Client, job_id: str) -> list[tuple[str, dict[str, object]]]:
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_submit_stream_and_download(server: ServerProcess) -> None:
    alice = _client(server, "alice")
    created = alice.post("/v1/jobs", json={**JOB, "steps": 60}, headers={"Idempotency-Key": "fox-1"})
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    assert job_id == "alice.fox-1"
    events = _events(alice, job_id)
    names = [name for name, _ in events]
    assert names[0] == "state" and names[-1] == "done" and "progress" in names, names
    fractions = [float(body["fraction"]) for name, body in events if name == "progress"]  # type: ignore[arg-type]
    assert fractions == sorted(fractions)
    done = events[-1][1]
    assert done["state"] == "succeeded"
    image = done["result"]["images"][0]  # type: ignore[index]
    assert image["http_url"].startswith(server.env["SDQ_S3_PUBLIC_ENDPOINT_URL"])
    png = httpx.get(image["http_url"], timeout=30)
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 64)
    status = alice.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "succeeded" and status["result"]["images"][0]["seed"] == image["seed"]
    again = alice.post("/v1/jobs", json={**JOB, "steps": 60}, headers={"Idempotency-Key": "fox-1"})
    assert again.status_code == 202 and again.json()["job_id"] == job_id
    assert again.json()["state"] == "succeeded"  # the same job, not a new one
    other = alice.post("/v1/jobs", json={**JOB, "prompt": "a blue fox"}, headers={"Idempotency-Key": "fox-1"})
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"


def test_upload_then_img2img(server: ServerProcess, s3) -> None:  # type: ignore[no-untyped-def]
    alice = _client(server, "alice")
    upload = alice.post("/v1/uploads", files={"file": ("in.png", png_bytes(smooth_image(3)), "image/png")})
    assert upload.status_code == 201, upload.text
    url = upload.json()["url"]
    assert url.startswith("s3://sdqueue/uploads/alice/")
    job = {**JOB, "mode": "img2img", "image_url": url, "strength": 0.7, "steps": 4}
    job_id = alice.post("/v1/jobs", json=job).json()["job_id"]
    assert _events(alice, job_id)[-1][1]["state"] == "succeeded"
    bob = _client(server, "bob")
    stolen = bob.post("/v1/jobs", json=job)
    assert stolen.status_code == 422 and stolen.json()["error"]["param"] == "image_url"


def test_two_tenants_are_isolated(server: ServerProcess) -> None:
    alice, bob = _client(server, "alice"), _client(server, "bob")
    a = alice.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "same"}).json()["job_id"]
    b = bob.post("/v1/jobs", json={**JOB, "prompt": "bob's own"}, headers={"Idempotency-Key": "same"})
    assert b.status_code == 202 and b.json()["job_id"] != a
    unknown = bob.get("/v1/jobs/alice.never-submitted")
    for response in (bob.get(f"/v1/jobs/{a}"), bob.delete(f"/v1/jobs/{a}"), bob.get(f"/v1/jobs/{a}/events")):
        assert response.status_code == 404
        assert response.json()["error"]["message"].replace(a, "ID") == unknown.json()["error"][
            "message"
        ].replace("alice.never-submitted", "ID")
    assert alice.get(f"/v1/jobs/{a}").status_code == 200


def test_keys_and_lanes(server: ServerProcess) -> None:
    missing = _client(server, None).post("/v1/jobs", json=JOB)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = httpx.post(f"{server.url}/v1/jobs", json=JOB, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    carol = _client(server, "carol")
    assert carol.post("/v1/jobs", params={"lane": "interactive"}, json=JOB).status_code == 403
    assert carol.post("/v1/jobs", json=JOB).json()["lane"] == "bulk"


def test_openai_sdk(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["alice"], max_retries=0, timeout=120)
    generated = client.images.generate(
        prompt="a lighthouse",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 5},
    )
    assert generated.data is not None and len(generated.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))) for d in generated.data]
    assert all(i.size == (64, 64) and i.format == "PNG" for i in images)
    by_url = client.images.generate(
        prompt="a lighthouse", size="64x64", model="sdqueue", extra_body={"steps": 2}
    )
    assert by_url.data and httpx.get(by_url.data[0].url or "", timeout=30).status_code == 200
    edited = client.images.edit(
        image=("in.png", png_bytes(smooth_image(4)), "image/png"),
        prompt="in snow",
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 4},
    )
    assert edited.data and Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json or ""))).size == (
        64,
        64,
    )
    with pytest.raises(openai.BadRequestError) as mask:
        client.images.edit(
            image=("in.png", png_bytes(smooth_image(4)), "image/png"),
            prompt="x",
            mask=("m.png", png_bytes(smooth_image(5)), "image/png"),
        )
    assert "mask" in str(mask.value) and "inpainting" in str(mask.value)
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(prompt="x", size="65x64")
    assert "size" in str(size.value) and "multiple of 8" in str(size.value)
    with pytest.raises(openai.BadRequestError, match="model"):
        client.images.generate(prompt="x", model="dall-e-3")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_rate_limit_and_concurrency_quota(idle: ServerProcess) -> None:
    bob = _client(idle, "bob")
    answers = [bob.post("/v1/jobs", json=JOB) for _ in range(4)]
    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    third = bob.get(f"/v1/jobs/{answers[2].json()['job_id']}").json()
    assert third["state"] == "queued" and third["queue"] == {"position": 2, "waiting": 3}
    limited = bob.post("/v1/jobs", json=JOB)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    alice = _client(idle, "alice")
    first = alice.post("/v1/jobs", json=JOB).json()["job_id"]
    assert alice.post("/v1/jobs", json=JOB).status_code == 202
    over = alice.post("/v1/jobs", json=JOB)
    assert over.status_code == 429 and over.json()["error"]["code"] == "concurrency_quota_exceeded"
    assert alice.delete(f"/v1/jobs/{first}").json()["state"] == "cancelled"
    assert alice.post("/v1/jobs", json=JOB).status_code == 202


def _bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _declare_huge_upload(port: int) -> bytes:
    """Announce a 50 MB body and send none of it: the answer must come from the headers alone."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEYS["alice"].encode()
            + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 52428800\r\n\r\n"
        )
        return sock.recv(4096)


def test_bad_uploads_never_reach_s3(idle: ServerProcess, s3) -> None:  # type: ignore[no-untyped-def]
    alice = _client(idle, "alice")
    before = s3.list_objects_v2(Bucket="sdqueue", Prefix="uploads/alice/").get("Contents", [])
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    cases = {
        "gif": (gif.getvalue(), 415, "not a PNG, JPEG or WebP"),
        "bomb": (_bomb_png(30000, 30000), 422, "pixels"),
        "truncated": (png_bytes(smooth_image(1))[:60], 422, "truncated or corrupt"),
        "empty": (b"", 422, "empty"),
    }
    for name, (data, status, words) in cases.items():
        response = alice.post("/v1/uploads", files={"file": (f"{name}.png", data, "image/png")})
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["error"]["message"] and response.json()["error"]["param"] == "file"
    assert _declare_huge_upload(idle.port).startswith(b"HTTP/1.1 413")
    after = s3.list_objects_v2(Bucket="sdqueue", Prefix="uploads/alice/").get("Contents", [])
    assert [o["Key"] for o in after] == [o["Key"] for o in before]


def test_try_it_page_in_chromium(server: ServerProcess, tmp_path: Path) -> None:
    """The page at / in headless Debian chromium: a job submitted, progress over SSE, the image shown."""
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "try-it-page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 900})
            page.goto(server.url + "/")
            page.fill("#key", KEYS["alice"])
            page.fill("#prompt", "a lighthouse at dusk")
            page.select_option("#size", "64x64")
            page.fill("#steps", "40")
            page.click("#go")
            page.wait_for_function(
                "document.getElementById('state').textContent === 'succeeded'", timeout=120_000
            )
            page.wait_for_function(
                "document.querySelector('#result img')?.naturalWidth === 64", timeout=30_000
            )
            assert page.evaluate("document.getElementById('bar').value") == 1
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert Image.open(shot).size[0] == 800
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)


BAD_JOBS = [
    ({"prompt": "x"}, "mode", "must be 'txt2img', 'img2img' or 'inpaint'"),
    ({**JOB, "steps": 999}, "steps", "less than or equal to 150"),
    ({**JOB, "width": 65}, "width", "multiple of 8"),
    ({**JOB, "colour": "red"}, "colour", "unknown field"),
    ({**JOB, "output": {"bucket": "nope"}}, "output.bucket", "not an allowed output bucket"),
    ({**JOB, "callback_task": "mine.done"}, "callback_task", "not accepted over HTTP"),
    ({**JOB, "mode": "img2img", "image_url": "http://169.254.169.254/x"}, "image_url", "use s3://bucket/key"),
    ([1, 2], "body", "send a JSON object"),
]


def test_bad_jobs_are_4xx_naming_the_field(idle: ServerProcess) -> None:
    alice = _client(idle, "alice")
    for body, field, words in BAD_JOBS:
        response = alice.post("/v1/jobs", json=body)
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (422, field), (body, error)
        assert words in error["message"]
    broken = alice.post("/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["error"]["message"]
    lane = alice.post("/v1/jobs", params={"lane": "fast"}, json=JOB)
    assert lane.status_code == 422 and lane.json()["error"]["param"] == "lane"


def test_the_servers_messages_are_the_ones_kombu_writes(logdir: Path) -> None:
    """The front door enqueues without kombu: its list entry must match what SdQueue.submit writes."""
    import base64 as b64

    from devstack.services import RedisServer
    from sdqueue import SdQueue, Settings, Txt2ImgJob
    from sdqueue.server.publish import envelope

    redis = RedisServer(logdir).start()
    try:
        queue = SdQueue(Settings(redis_url=redis.url))
        queue.celery.conf.task_send_sent_event = False
        spec = Txt2ImgJob(prompt="a boat", width=64, height=64, steps=1, job_id="same-job")
        queue.submit(spec, lane="bulk")
        kombu = json.loads(queue.redis.lrange("sdqueue.bulk", 0, -1)[0])
        ours = json.loads(envelope(queue.celery, "same-job", spec, "sdqueue.bulk"))
    finally:
        redis.stop()
    for message in (kombu, ours):
        message["properties"].pop("delivery_tag")
        message["headers"].pop("sdq_submitted_at")
        message["body"] = json.loads(b64.b64decode(message["body"]))
    assert ours == kombu


def test_uploads_and_submits_draw_from_one_token_bucket(redis_server: RedisServer) -> None:
    """Both Lua scripts run the same ``take_token`` function on the same bucket: tokens taken by
    uploads (``Quotas.take_token``) are gone for submits, and a refusal says when to come back."""
    import asyncio

    from sdqueue import Txt2ImgJob
    from sdqueue.celeryconfig import make_celery
    from sdqueue.server.publish import Submitter
    from sdqueue.server.quotas import Quotas, rate_key
    from sdqueue.settings import Settings

    client = redis.Redis.from_url(redis_server.url)
    tenant = f"bucket-{uuid.uuid4().hex[:8]}"
    quotas = Quotas(client, max_age_s=60)
    assert quotas.take_token(tenant, per_minute=6, burst=2) is None  # an upload takes one of two
    settings = Settings(redis_url=redis_server.url)
    submitter = Submitter(make_celery(settings, "bucket-test"), settings, max_age_s=60)
    spec = Txt2ImgJob(prompt="bucket", width=64, height=64, steps=1)

    async def submit(job_id: str) -> object:
        return await submitter.submit(tenant, spec, job_id, "interactive", limit=10, rate=(6, 2))

    async def both() -> tuple[object, object]:
        return await submit(f"b1-{tenant}"), await submit(f"b2-{tenant}")

    queued, refused = asyncio.run(both())
    assert queued is True
    assert isinstance(refused, Refusal) and refused.message.startswith("rate limit")
    assert 1 <= refused.retry_after_s <= 10
    upload = quotas.take_token(tenant, per_minute=6, burst=2)
    assert upload is not None and upload.retry_after_s >= 1  # the submit took the last token
    assert 0 <= float(client.hget(rate_key(tenant), "tokens") or -1) < 1
