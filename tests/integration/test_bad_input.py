"""Bad input beyond the spec fields (tests/test_validation.py covers those): input URLs, input
objects, image files and raw broker messages. Each is refused with a clear error, checked at
submit where the producer can see it and again in the worker (a raw Celery client bypasses the
producer); the shared worker keeps serving afterwards. Then the images that must be accepted
(CMYK, 16-bit, grayscale, alpha, palette, EXIF-rotated) are decoded correctly, both by
``decode_input_image`` directly and through the worker. Also two security items: presigned URL
expiry, and JSON-only messages (pickle and YAML refused, never deserialised).
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from celery.result import AsyncResult
from PIL import Image

from devstack.services import MotoServer, port_open, wait_for
from sdqueue import Img2ImgJob, InputImageError, JobFailed, SdQueue, Txt2ImgJob
from sdqueue.names import IMG2IMG_TASK, TXT2IMG_TASK, deliveries_key
from sdqueue_worker.images import decode_input_image
from tests.helpers import ROOT, png_bytes, read_png, smooth_image

GOOD = dict(prompt="a harbour", width=64, height=64, steps=4)
MAX_PIXELS = 4096 * 4096


def good_job_still_runs(queue: SdQueue) -> None:
    assert queue.submit(Txt2ImgJob(**{**GOOD, "steps": 2})).wait(timeout=120).images


# --- input URLs outside the allow-list ----------------------------------------------------------


def bad_urls(endpoint: str) -> list[tuple[str, str, str]]:
    """(case, image_url, text the error must contain); ``endpoint`` is the storage endpoint."""
    port = urlsplit(endpoint).port
    return [
        ("another bucket", "s3://other/cat.png", "bucket 'other' is not allowed"),
        ("bucket not allowed via the endpoint", f"{endpoint}/other/cat.png", "bucket 'other' is not allowed"),
        ("cloud metadata", "http://169.254.169.254/latest/meta-data/iam/", "only on the storage endpoint"),
        ("metadata as hex", "http://0xa9fea9fe/latest/meta-data/", "only on the storage endpoint"),
        ("metadata as decimal", "http://2852039166/latest/meta-data/", "only on the storage endpoint"),
        ("metadata as IPv6", "http://[::ffff:169.254.169.254]/latest/", "only on the storage endpoint"),
        ("other http host", "http://example.com/inputs/cat.png", "only on the storage endpoint"),
        (
            "endpoint host, other port",
            f"http://127.0.0.1:{port + 1}/inputs/cat.png",
            "only on the storage endpoint",
        ),
        ("endpoint as https", f"https://127.0.0.1:{port}/inputs/cat.png", "only on the storage endpoint"),
        (
            "credentials in URL",
            f"http://user:pw@127.0.0.1:{port}/inputs/cat.png",
            "only on the storage endpoint",
        ),
        (
            "DNS alias of loopback",
            f"http://127.0.0.1.nip.io:{port}/inputs/cat.png",
            "only on the storage endpoint",
        ),
        ("file URL", "file:///etc/passwd", "scheme 'file' is not accepted"),
        ("ftp URL", "ftp://127.0.0.1/inputs/cat.png", "scheme 'ftp' is not accepted"),
        ("gopher to Redis", "gopher://127.0.0.1:6379/_FLUSHALL", "scheme 'gopher' is not accepted"),
        ("data URL", "data:image/png;base64,iVBORw0KGgo=", "scheme 'data' is not accepted"),
        ("no scheme", "inputs/cat.png", "scheme '(none)' is not accepted"),
        ("dot-dot key", "s3://inputs/../sdqueue/outputs/x/0.png", "'..' segments"),
        ("encoded dot-dot key", "s3://inputs/a/%2e%2e/b.png", "'..' segments"),
        ("bucket without key", "s3://inputs/", "expected a bucket and an object key"),
    ]


def img2img(url: str, **extra: Any) -> dict[str, Any]:
    return dict(GOOD, image_url=url, steps=10, strength=0.5, **extra)


def test_submit_refuses_urls_outside_the_allow_list(queue: SdQueue, moto: MotoServer) -> None:
    cases = bad_urls(moto.url)
    for name, url, hint in cases:
        with pytest.raises(InputImageError) as info:
            queue.submit(Img2ImgJob(**img2img(url)))
        assert hint in str(info.value), (name, str(info.value))
    print(f"{len(cases)} input URLs refused at submit")


@pytest.mark.usefixtures("worker")
def test_worker_refuses_the_same_urls_from_a_raw_client(queue: SdQueue, moto: MotoServer) -> None:
    cases = bad_urls(moto.url)
    sent = [
        (name, hint, queue.celery.send_task(IMG2IMG_TASK, kwargs=img2img(url), queue="sdqueue.interactive"))
        for name, url, hint in cases
    ]
    for name, hint, result in sent:
        result.get(timeout=120, propagate=False)
        assert result.state == "FAILURE", name
        assert type(result.result).__name__ == "InputImageError", (name, result.result)
        assert hint in str(result.result), (name, str(result.result))
        assert not queue.redis.exists(deliveries_key(result.id, 0)), (
            f"{name}: refused before it counted as a run"
        )
    good_job_still_runs(queue)
    print(f"{len(cases)} input URLs refused by the worker before any fetch; worker still serving")


# --- input objects that are missing, too big or not acceptable images -----------------------------


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is patched to claim width x height."""
    data = bytearray(png_bytes(smooth_image(1), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def fits_file() -> bytes:
    """A minimal FITS image (the format of Pillow CVE-2026-40192), written by hand."""
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    2",
        "NAXIS1  =                    8",
        "NAXIS2  =                    8",
        "END",
    ]
    header = "".join(card.ljust(80) for card in cards).ljust(2880).encode()
    return header + bytes(64).ljust(2880, b"\x00")


def image_as(fmt: str, **save: Any) -> bytes:
    return png_bytes(smooth_image(2), fmt, **save)


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
NOT_ACCEPTED = "not a PNG, JPEG or WebP file"


def bad_objects() -> list[tuple[str, bytes | None, str]]:
    """(case, object body or None for a missing object, text the error must contain)."""
    valid_png = image_as("PNG")
    valid_jpeg = image_as("JPEG")
    return [
        ("missing object", None, "no such object"),
        ("over the size limit", b"\x89PNG" + bytes(20 * 1024 * 1024), "over the 20971520-byte limit"),
        ("empty object", b"", "the object is empty"),
        ("text, not an image", b"hello, I am not an image\n" * 10, NOT_ACCEPTED),
        ("truncated PNG", valid_png[: len(valid_png) // 2], "truncated or corrupt"),
        ("truncated JPEG", valid_jpeg[: len(valid_jpeg) // 2], "truncated or corrupt"),
        ("PNG bomb 50000x50000", png_with_size(50_000, 50_000), "pixels"),
        ("PNG just over the pixel cap", png_with_size(4100, 4100), "pixels"),
        ("JPEG bomb 65000x65000", jpeg_with_size(65_000, 65_000), "pixels"),
        ("TIFF", image_as("TIFF"), NOT_ACCEPTED),
        ("GIF", image_as("GIF"), NOT_ACCEPTED),
        ("BMP", image_as("BMP"), NOT_ACCEPTED),
        ("ICO", image_as("ICO"), NOT_ACCEPTED),
        ("SVG", SVG, NOT_ACCEPTED),
        ("FITS", fits_file(), NOT_ACCEPTED),
    ]


@pytest.mark.usefixtures("worker")
def test_worker_refuses_bad_input_objects(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    prefix = f"bad/{uuid.uuid4().hex[:8]}"
    handles = []
    for index, (name, body, hint) in enumerate(bad_objects()):
        key = f"{prefix}/{index}.img"
        if body is not None:
            s3.put_object(Bucket="inputs", Key=key, Body=body)
        handles.append((name, hint, queue.submit(Img2ImgJob(**img2img(f"s3://inputs/{key}")))))
    started = time.monotonic()
    for name, hint, handle in handles:
        with pytest.raises(JobFailed) as info:
            handle.wait(timeout=120)
        assert info.value.error_type == "InputImageError", (name, info.value)
        assert hint in info.value.reason, (name, info.value.reason)
    good_job_still_runs(queue)
    print(
        f"{len(handles)} bad input objects refused in {time.monotonic() - started:.1f}s in all; worker still serving"
    )


# --- raw broker messages: pickle, YAML, malformed, unknown task ------------------------------------


class WritesAFile:
    """Unpickling this opens (creates) a file: proof that a pickle was deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


def log_has(worker, text: str, timeout: float = 30) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in worker.log_path.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("serializer", ["pickle", "yaml"])
def test_worker_refuses_non_json_messages(queue: SdQueue, worker, tmp_path: Path, serializer: str) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "deserialised"
    job_id = f"{serializer}-{uuid.uuid4().hex[:8]}"
    payload: dict[str, Any] = dict(
        GOOD, prompt=WritesAFile(marker) if serializer == "pickle" else "yaml prompt"
    )
    queue.celery.send_task(
        TXT2IMG_TASK, kwargs=payload, task_id=job_id, queue="sdqueue.interactive", serializer=serializer
    )
    content_type = {"pickle": "application/x-python-serialize", "yaml": "application/x-yaml"}[serializer]
    assert log_has(worker, f"Refusing to deserialize untrusted content of type {serializer} ({content_type})")
    good_job_still_runs(queue)
    assert not marker.exists(), "the worker unpickled the message"
    assert not queue.redis.exists(deliveries_key(job_id, 0)), "the job must never run"
    refused = AsyncResult(job_id, app=queue.celery)
    assert refused.state == "FAILURE", "a refused message still gets an answer"
    assert "Refusing to deserialize untrusted content" in str(refused.result), refused.result
    print(
        f"{serializer} message refused (FAILURE: ContentDisallowed), never deserialised or run; worker still serving"
    )


def publish_raw(queue: SdQueue, task: str, body: Any, job_id: str) -> None:
    """Publish a message with Celery protocol-2 headers and an arbitrary JSON body."""
    from kombu import Producer

    headers = {
        "lang": "py",
        "task": task,
        "id": job_id,
        "root_id": job_id,
        "parent_id": None,
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "test",
        "retries": 0,
    }
    with queue.celery.connection_for_write() as conn:
        Producer(conn).publish(
            body,
            exchange="sdqueue.interactive",
            routing_key="sdqueue.interactive",
            serializer="json",
            headers=headers,
        )


MALFORMED: list[tuple[str, str, Any, str]] = [
    ("body is a string", TXT2IMG_TASK, "not a celery body", "malformed task message body"),
    ("body is a number", TXT2IMG_TASK, 42, "malformed task message body"),
    ("body has two items", TXT2IMG_TASK, [[], {"prompt": "x"}], "malformed task message body"),
    ("args is an object", TXT2IMG_TASK, [{"a": 1}, {"prompt": "x"}, {}], "malformed task message body"),
    ("kwargs is a list", TXT2IMG_TASK, [[], ["prompt", "x"], {}], "malformed task message body"),
    ("embed is a string", TXT2IMG_TASK, [[], {"prompt": "x"}, "oops"], "malformed task message body"),
    ("unknown task name", "sdqueue.delete_everything", [[], {}, {}], "NotRegistered"),
]


def log_size(worker) -> int:  # type: ignore[no-untyped-def]
    return len(worker.log_path.read_text(errors="replace"))


@pytest.mark.parametrize(("name", "task", "body", "hint"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_worker_survives_malformed_messages(
    queue: SdQueue,
    worker,
    name: str,
    task: str,
    body: Any,  # type: ignore[no-untyped-def]
    hint: str,
) -> None:
    """A raw client publishes a message Celery cannot use: it is refused (logged and dropped, or
    failed with a result) and the worker keeps serving; before worker/strategy.py a malformed
    body stopped the whole worker."""
    job_id = f"raw-{uuid.uuid4().hex[:8]}"
    since = log_size(worker)
    publish_raw(queue, task, body, job_id)
    result = AsyncResult(job_id, app=queue.celery)

    def refused() -> str:
        if result.state == "FAILURE":
            return f"{type(result.result).__name__}: {result.result}"
        log = worker.log_path.read_text(errors="replace")[since:]
        return log if hint in log else ""

    deadline = time.monotonic() + 30
    while not refused() and time.monotonic() < deadline:
        time.sleep(0.1)
    good_job_still_runs(queue)
    assert hint in refused(), (name, result.state, refused()[-2000:])
    assert not queue.redis.exists(deliveries_key(job_id, 0)), "never run"
    outcome = "failed: " + refused()[:80] if result.state == "FAILURE" else "logged and dropped"
    print(f"malformed message ({name}): {outcome}; worker still serving")


# --- images that must be accepted and converted ----------------------------------------------------


def upright_image() -> Image.Image:
    """A smooth, non-square image (so a missed rotation shows in the size too)."""
    return smooth_image(9, size=96).crop((0, 0, 64, 96))


def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (colour type 2, depth 16), written by hand: Pillow can read
    these but not write them."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """Stored rotated 90 degrees counter-clockwise, with EXIF orientation 6 ("rotate 90 CW to view")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return png_bytes(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


def on_white(rgba: Image.Image) -> np.ndarray:
    array = np.asarray(rgba, dtype=np.float64)
    alpha = array[..., 3:] / 255.0
    return array[..., :3] * alpha + 255.0 * (1 - alpha)


def accepted_cases() -> list[tuple[str, bytes, np.ndarray, float]]:
    """(case, file bytes, the RGB pixels expected after decoding, tolerance in 0..255 units)."""
    rgb = upright_image()
    array = np.asarray(rgb, dtype=np.float64)
    gray = rgb.convert("L")
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size).point(lambda v: 128 + v // 2))  # half to opaque
    palette = rgb.quantize(64)
    gray16 = Image.fromarray((np.asarray(gray, dtype=np.uint16) * 257).astype(np.uint16))
    return [
        ("CMYK JPEG", png_bytes(rgb.convert("CMYK"), "JPEG", quality=95), array, 6.0),
        (
            "16-bit grayscale PNG",
            png_bytes(gray16, "PNG"),
            np.repeat(np.asarray(gray, float)[..., None], 3, 2),
            1.0,
        ),
        ("16-bit RGB PNG", png16_rgb(np.asarray(rgb, dtype=np.uint16) * 257), array, 1.0),
        ("grayscale PNG", png_bytes(gray, "PNG"), np.repeat(np.asarray(gray, float)[..., None], 3, 2), 0.0),
        (
            "grayscale+alpha PNG",
            png_bytes(rgba.convert("LA"), "PNG"),
            on_white(rgba.convert("LA").convert("RGBA")),
            1.0,
        ),
        ("RGBA PNG (on white)", png_bytes(rgba, "PNG"), on_white(rgba), 1.0),
        ("palette PNG", png_bytes(palette, "PNG"), np.asarray(palette.convert("RGB"), float), 0.0),
        ("EXIF-rotated JPEG", exif_rotated_jpeg(rgb), array, 6.0),
        ("lossless WebP", png_bytes(rgb, "WEBP", lossless=True), array, 0.0),
    ]


@pytest.mark.parametrize("case", accepted_cases(), ids=[c[0] for c in accepted_cases()])
def test_decode_converts_to_upright_8_bit_rgb(case: tuple[str, bytes, np.ndarray, float]) -> None:
    name, data, expected, tolerance = case
    image = decode_input_image(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (64, 96), (name, image.mode, image.size)
    error = np.abs(np.asarray(image, dtype=np.float64) - expected).mean()
    assert error <= tolerance, f"{name}: mean error {error:.2f} > {tolerance}"


def unrotated_reading(data: bytes) -> np.ndarray:
    """What the worker would have used had it ignored the EXIF orientation."""
    from sdqueue_worker.images import fit_to

    return np.asarray(fit_to(Image.open(io.BytesIO(data)).convert("RGB"), 64, 96), dtype=np.float32) / 255.0


@pytest.mark.usefixtures("worker")
def test_worker_accepts_and_converts_images(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    """Each kind goes through the worker next to a reference: the expected 8-bit RGB pixels as a
    plain PNG, same seed and settings. Equal decodes give (nearly) equal outputs; the output also
    stays near its input (low strength), and for EXIF far from the unrotated reading."""
    prefix = f"ok/{uuid.uuid4().hex[:8]}"
    spec = dict(prompt="p", width=64, height=96, steps=20, strength=0.15, seed=3)
    runs = []
    for index, (name, data, expected, _) in enumerate(accepted_cases()):
        reference = png_bytes(Image.fromarray(np.round(expected).astype(np.uint8), "RGB"))
        handles = []
        for suffix, body in (("case", data), ("reference", reference)):
            s3.put_object(Bucket="inputs", Key=f"{prefix}/{index}.{suffix}", Body=body)
            handles.append(
                queue.submit(Img2ImgJob(image_url=f"s3://inputs/{prefix}/{index}.{suffix}", **spec))
            )
        runs.append((name, data, expected / 255.0, handles))
    errors = {}
    for name, data, target, handles in runs:
        output, reference = (read_png(s3, "sdqueue", h.wait(timeout=120).images[0].key) for h in handles)
        errors[name] = (np.abs(output - reference).mean(), np.abs(output - target).mean())
        if name.startswith("EXIF"):
            assert np.abs(output - unrotated_reading(data)).mean() > 2 * errors[name][1], (
                "EXIF rotation ignored"
            )
    report = ", ".join(f"{name} {same:.3f}/{near:.3f}" for name, (same, near) in errors.items())
    print(f"{len(runs)} image kinds through the worker, |out-reference out|/|out-input|: {report}")
    for name, (same, near) in errors.items():
        assert same < 0.03 and near < 0.25, f"{name}: |out-reference| {same:.3f}, |out-input| {near:.3f}"


# --- presigned URL expiry ---------------------------------------------------------------------------


def expires_in(url: str) -> float:
    """Seconds a presigned URL stays valid (SigV4 X-Amz-Expires or SigV2 Expires)."""
    query = parse_qs(urlsplit(url).query)
    if "X-Amz-Expires" in query:
        return float(query["X-Amz-Expires"][0])
    return float(query["Expires"][0]) - time.time()


def test_presigned_url_expiry_is_configurable(queue: SdQueue, moto: MotoServer) -> None:
    import urllib.request

    from sdqueue.locations import ObjectRef
    from sdqueue_worker.settings import WorkerSettings as Settings
    from sdqueue_worker.storage import WorkerStorage as Storage

    ref = ObjectRef("sdqueue", f"presign/{uuid.uuid4().hex[:6]}.png")
    Storage(queue.settings).client.put_object(Bucket=ref.bucket, Key=ref.key, Body=png_bytes(smooth_image(1)))
    short = Storage(Settings(**{**queue.settings.model_dump(), "presign_expires_s": 90}))
    default_url, short_url, given_url = queue.storage.presign(ref), short.presign(ref), short.presign(ref, 30)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in short_url, "presigned URLs must be SigV4 (SigV2 is retired)"
    assert abs(expires_in(default_url) - 3600) <= 2
    assert abs(expires_in(short_url) - 90) <= 2 and abs(expires_in(given_url) - 30) <= 2
    with urllib.request.urlopen(short_url, timeout=10) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"
    print(
        f"presign expiry: default {expires_in(default_url):.0f}s, SDQ_PRESIGN_EXPIRES_S=90 -> "
        f"{expires_in(short_url):.0f}s, per call 30 -> {expires_in(given_url):.0f}s (SigV4)"
    )


# --- least-privilege S3 policies (docs/policies), enforced by moto's IAM ----------------------------

POLICIES = ROOT / "docs" / "policies"
SETUP_ACTIONS = 9  # unauthenticated calls below: 3 buckets, 2 users, 2 access keys, 2 policies


class AuthMotoServer(MotoServer):
    """moto's S3 server enforcing IAM policies after the first SETUP_ACTIONS calls."""

    def __init__(self, logdir: Path, setup_actions: int = SETUP_ACTIONS) -> None:
        super().__init__(logdir)
        self.name, self.log_path = "moto-iam", logdir / f"moto-iam-{setup_actions}.log"
        self.setup_actions = setup_actions

    def start(self) -> AuthMotoServer:
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(self.setup_actions)}
        self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], env=env)
        wait_for(lambda: port_open(self.port), 20, "moto server (IAM)")
        return self


def principal(iam, name: str, inputs: str, outputs: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    document = (POLICIES / f"{name}-s3-policy.json").read_text()
    document = document.replace("INPUT_BUCKET", inputs).replace("OUTPUT_BUCKET", outputs)
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    iam.put_user_policy(UserName=name, PolicyName=f"sdqueue-{name}", PolicyDocument=document)
    return {"s3_access_key_id": key["AccessKeyId"], "s3_secret_access_key": key["SecretAccessKey"]}


def denied(call: Any) -> bool:
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"] == "AccessDenied"
    except Exception as exc:
        return "AccessDenied" in str(exc)
    return False


def test_documented_bucket_policies_are_enough_and_no_more(logdir: Path) -> None:
    """The worker and producer policies of docs/policies allow exactly the calls sdqueue makes:
    the worker's input read, manifest check, conditional image/manifest writes; the producer's
    input upload and presigned result download. Everything else is denied."""
    import boto3

    from sdqueue.locations import ObjectRef
    from sdqueue_worker.settings import WorkerSettings as Settings
    from sdqueue_worker.storage import WorkerStorage as Storage

    server = AuthMotoServer(logdir).start()
    try:
        admin = dict(
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="admin",
            aws_secret_access_key="admin",
        )
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        for bucket in ("results", "uploads", "elsewhere"):
            s3.create_bucket(Bucket=bucket)
        base = dict(s3_endpoint_url=server.url, output_bucket="results", input_buckets="uploads")
        worker = Storage(Settings(**base, **principal(iam, "worker", "uploads", "results")))
        producer = Storage(Settings(**base, **principal(iam, "producer", "uploads", "results")))
        image, source = ObjectRef("results", "outputs/job1/0.png"), ObjectRef("uploads", "u/in.png")
        manifest = ObjectRef("results", "outputs/job1/manifest.json")
        producer.client.put_object(Bucket=source.bucket, Key=source.key, Body=png_bytes(smooth_image(1)))
        assert worker.read_input(source)[0].startswith(b"\x89PNG")
        assert worker.read_json(manifest) is None
        assert worker.put_once(image, b"png", "image/png", {}) and not worker.put_once(
            image, b"x", "image/png", {}
        )
        assert worker.put_once(manifest, b"{}", "application/json", {}) and worker.read_json(manifest) == {}
        orphan = ObjectRef("results", "outputs/job2/0.png")
        assert worker.put_once(orphan, b"png", "image/png", {})
        worker.delete_quietly([orphan])  # the images of a job whose manifest write was refused
        assert worker.read_json_quietly(orphan) is None
        worker.probe_write(ObjectRef("results", "outputs/.sdqueue-probe/w"))  # the start-up check
        # a presigned URL carries its signer's rights; moto's IAM mode cannot check query-string
        # signatures (it answers 500), so the producer's own GetObject stands in for the download
        assert producer.client.get_object(Bucket=image.bucket, Key=image.key)["Body"].read() == b"png"
        refused = {
            "worker writes an input": lambda: worker.client.put_object(
                Bucket="uploads", Key="u/x", Body=b"x"
            ),
            "worker deletes an input": lambda: worker.client.delete_object(Bucket="uploads", Key=source.key),
            "worker writes outside outputs/": lambda: worker.client.put_object(
                Bucket="results", Key="x", Body=b"x"
            ),
            "worker reads another bucket": lambda: worker.client.list_objects_v2(Bucket="elsewhere"),
            "producer writes a result": lambda: producer.client.put_object(
                Bucket="results", Key=image.key, Body=b"x"
            ),
            "producer reads an input": lambda: producer.client.get_object(Bucket="uploads", Key=source.key),
            "producer lists": lambda: producer.client.list_objects_v2(Bucket="results"),
        }
        allowed = [name for name, call in refused.items() if not denied(call)]
        assert not allowed, f"allowed but should be denied: {allowed}"
    finally:
        server.stop()
    print(f"bucket policies (docs/policies): every call sdqueue makes allowed; {len(refused)} others denied")


def test_s3_write_refusals_are_permanent_and_a_refused_manifest_leaves_no_images(logdir: Path) -> None:
    """AccessDenied on an output write is a permanent StorageRefused naming the bucket and the
    missing permission (never InputImageError, never retried); when the manifest write is the one
    refused, the job's images are removed again."""
    import boto3

    from sdqueue.errors import StorageRefused, TransientError
    from sdqueue.locations import ObjectRef
    from sdqueue_worker.jobs import JobRunner
    from sdqueue_worker.settings import WorkerSettings
    from sdqueue_worker.storage import WorkerStorage
    from sdqueue_worker.work import parse_message

    server = AuthMotoServer(logdir, setup_actions=4).start()
    try:
        admin = dict(
            endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="a"
        )
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        s3.create_bucket(Bucket="results")
        iam.create_user(UserName="w")
        key = iam.create_access_key(UserName="w")["AccessKey"]
        outputs = "arn:aws:s3:::results/outputs/*"
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:PutObject", "s3:GetObject", "s3:DeleteObject"],
                    "Resource": outputs,
                },
                {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::results"},
                {
                    "Effect": "Deny",
                    "Action": "s3:PutObject",
                    "Resource": "arn:aws:s3:::results/outputs/*/manifest.json",
                },
            ],
        }
        iam.put_user_policy(UserName="w", PolicyName="w", PolicyDocument=json.dumps(policy))
        settings = WorkerSettings(
            s3_endpoint_url=server.url,
            output_bucket="results",
            s3_access_key_id=key["AccessKeyId"],
            s3_secret_access_key=key["SecretAccessKey"],
        )
        storage = WorkerStorage(settings)
        with pytest.raises(StorageRefused) as refused:
            storage.put_once(ObjectRef("results", "elsewhere/x.png"), b"png", "image/png", {})
        assert not isinstance(refused.value, (InputImageError, TransientError))
        assert "s3:PutObject on bucket 'results'" in str(refused.value), str(refused.value)
        item = parse_message("sdqueue.txt2img", "orphan-1", (), dict(GOOD), None, settings)
        images = []
        for index in range(2):
            ref = ObjectRef(item.folder.bucket, f"{item.folder.key}/{index}.png")
            assert storage.put_once(ref, b"png", "image/png", {})
            images.append({"bucket": ref.bucket, "key": ref.key})
        runner = JobRunner(settings, None, None, storage, "test")  # type: ignore[arg-type]
        with pytest.raises(StorageRefused, match="s3:PutObject"):
            runner.commit_manifest(item, {"job_id": item.job_id}, images)
        left = storage.client.list_objects_v2(Bucket="results", Prefix=item.folder.key).get("KeyCount", 0)
        assert left == 0, "the images of a job without a manifest must be removed"
    finally:
        server.stop()
    print(
        "AccessDenied on writes: StorageRefused naming s3:PutObject and the bucket; refused manifest: 2 images removed"
    )
