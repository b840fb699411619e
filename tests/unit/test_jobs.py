"""The job runner's own logic (validation, seeds, output keys, manifest, the conditional commit),
with in-memory stand-ins for the storage and the GPU thread, which are not under test here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY

from sdqueue.contract import Img2ImgJob, Txt2ImgJob
from sdqueue.errors import StorageUnavailable
from sdqueue.locations import ObjectRef
from sdqueue.names import BULK_QUEUE, IMG2IMG_TASK, TXT2IMG_TASK
from sdqueue_worker.generation import GenerationRequest
from sdqueue_worker.jobs import (
    JobContext,
    JobRunner,
    result_from_manifest,
)
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.work import WorkItem, parse_message

SETTINGS = WorkerSettings(
    input_buckets=["inputs"],
    output_buckets=["extra"],
    webhook_hosts=["hooks.example"],
    s3_endpoint_url="http://minio.local:9000",
)
PATH_STYLE = "http://minio.local:9000/inputs/in/a.png"
GOOD = {"prompt": "p", "width": 64, "height": 64, "steps": 2}


class MemoryStorage:
    """Objects in a dict, with the If-None-Match semantics of WorkerStorage.put_once."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], tuple[bytes, dict[str, str]]] = {}
        self.reads: list[ObjectRef] = []

    def read_json(self, ref: ObjectRef) -> dict[str, Any] | None:
        self.reads.append(ref)
        stored = self.objects.get((ref.bucket, ref.key))
        return json.loads(stored[0]) if stored else None

    def put_once(self, ref: ObjectRef, body: bytes, content_type: str, metadata: dict[str, str]) -> bool:
        if (ref.bucket, ref.key) in self.objects:
            return False
        self.objects[(ref.bucket, ref.key)] = (body, {"content-type": content_type, **metadata})
        return True

    def read_input(self, ref: ObjectRef) -> tuple[bytes, str]:
        return self.objects[(ref.bucket, ref.key)][0], "etag-1"


class InstantGpu:
    """Stands in for GpuExecutor: answers each request at once with a flat colour per image."""

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []
        self.preparing_now = 0

    @contextmanager
    def preparing(self) -> Iterator[None]:
        self.preparing_now += 1
        try:
            yield
        finally:
            self.preparing_now -= 1

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        assert self.preparing_now == 1, "submit happens while the task thread is marked preparing"
        self.requests.append(request)
        request.batch_images = 5
        request.pipeline = "PipelineThatRan"
        job = request.job
        pixels = np.stack(
            [np.full((job.height, job.width, 3), i * 40, np.uint8) for i in range(len(request.seeds))]
        )
        request.future.set_result(pixels)
        return request


def item(job: Txt2ImgJob | Img2ImgJob, job_id: str, lane: str | None = None) -> WorkItem:
    task = TXT2IMG_TASK if job.mode == "txt2img" else IMG2IMG_TASK
    return parse_message(task, job_id, [], job.model_dump(mode="json", exclude={"mode"}), lane, SETTINGS)


def runner() -> JobRunner:
    import tempfile
    from pathlib import Path

    from sdqueue_worker.tiny_model import build_tokenizer

    pipe = SimpleNamespace(  # what the runner reads of a pipeline: tokenizers and native size
        tokenizer=build_tokenizer(Path(tempfile.mkdtemp())),
        tokenizer_2=None,
        unet=SimpleNamespace(config=SimpleNamespace(sample_size=8)),
        vae_scale_factor=8,
    )
    runtime = SimpleNamespace(
        txt2img=pipe,
        model_id="tiny",
        dtype=torch.float16,
        device=torch.device("cpu"),
        schedulers={"default": SimpleNamespace(), "euler": Image.new("RGB", (1, 1))},
        versions={"torch": "x"},
        load_count=1,
        fp8_layers=0,
        attention="sdpa",
    )
    return JobRunner(SETTINGS, runtime, InstantGpu(), MemoryStorage(), hostname="host-1")  # type: ignore[arg-type]


def test_a_job_is_stored_then_committed_by_its_manifest() -> None:
    run = runner()
    progress, cancelled = (lambda step, total: None), (lambda: False)
    submitted = time.time() - 2
    started = time.monotonic()
    ctx = JobContext(submitted_at=submitted, on_progress=progress, is_cancelled=cancelled)
    result = run.run(item(Txt2ImgJob(**GOOD, seed=3, num_images=2, scheduler="euler"), "j1", BULK_QUEUE), ctx)
    [request] = run.executor.requests  # type: ignore[attr-defined]
    assert (request.job_id, request.seeds, request.lane_rank) == ("j1", [3, 4], 1)
    assert (
        request.on_progress is progress and request.is_cancelled is cancelled and request.init_image is None
    )
    assert started + 300 <= request.deadline <= time.monotonic() + 300
    objects = run.storage.objects  # type: ignore[attr-defined]
    assert set(objects) == {
        ("sdqueue", "outputs/j1/0.png"),
        ("sdqueue", "outputs/j1/1.png"),
        ("sdqueue", "outputs/j1/manifest.json"),
    }
    body, meta = objects[("sdqueue", "outputs/j1/1.png")]
    assert meta == {"content-type": "image/png", "job-id": "j1", "seed": "4"}
    assert np.asarray(Image.open(io.BytesIO(body)))[0, 0].tolist() == [40, 40, 40]
    manifest_body, manifest_meta = objects[("sdqueue", "outputs/j1/manifest.json")]
    assert manifest_meta == {"content-type": "application/json", "job-id": "j1"}
    manifest = json.loads(manifest_body)
    assert manifest["images"][1] == {
        "index": 1,
        "seed": 4,
        "url": "s3://sdqueue/outputs/j1/1.png",
        "bucket": "sdqueue",
        "key": "outputs/j1/1.png",
        "width": 64,
        "height": 64,
        "sha256": hashlib.sha256(body).hexdigest(),
        "format": "png",
        "content_type": "image/png",
    }
    assert manifest["model"] == {
        "id": "tiny",
        "alias": None,
        "revision": None,
        "dtype": "float16",
        "device": "cpu",
        "pipeline": "PipelineThatRan",
        "scheduler": "Image",
        "fp8_unet": False,
        "attention": "sdpa",
    }
    assert (manifest["job_id"], manifest["mode"], manifest["seeds"], manifest["input"]) == (
        "j1",
        "txt2img",
        [3, 4],
        None,
    )
    assert manifest["spec"]["prompt"] == "p" and manifest["versions"] == {"torch": "x"}
    assert manifest["manifest_url"] == "s3://sdqueue/outputs/j1/manifest.json"
    worker = manifest["worker"]
    assert (worker["hostname"], worker["batch_images"], worker["model_load_count"]) == ("host-1", 5, 1)
    assert (worker["pid"], worker["thread"]) == (os.getpid(), threading.current_thread().name)
    timings = manifest["timings"]
    assert {"generate_s", "encode_upload_s", "total_s", "queue_wait_s"} <= set(timings)
    assert 2 <= timings["queue_wait_s"] < 60 and 60 > timings["total_s"] >= timings["generate_s"] >= 0
    assert 0 <= timings["encode_upload_s"] < 60
    assert abs(manifest["created_at"] - time.time()) < 60
    assert result == result_from_manifest(manifest)
    assert run.storage.reads == [ObjectRef("sdqueue", "outputs/j1/manifest.json")]  # type: ignore[attr-defined]


def test_no_queue_wait_without_a_submit_time_and_none_below_zero() -> None:
    run = runner()
    result = run.run(item(Txt2ImgJob(**GOOD), "j2"), JobContext())
    assert "queue_wait_s" not in result["timings"]
    skewed = run.run(item(Txt2ImgJob(**GOOD), "j2b"), JobContext(submitted_at=time.time() + 30))  # clock skew
    assert skewed["timings"]["queue_wait_s"] == 0.0


def test_a_committed_job_is_counted_in_the_metrics() -> None:
    before = {name: sample(name, labels) for name, labels in METRICS}
    runner().run(item(Txt2ImgJob(**GOOD, num_images=2), "j-metrics"), JobContext())
    moved = {name: sample(name, labels) - before[name] for name, labels in METRICS}
    assert moved == {
        "sdqueue_batch_images_count": 1,
        "sdqueue_batch_images_sum": 5,
        "sdqueue_job_duration_seconds_count": 1,
    }


METRICS = [
    ("sdqueue_batch_images_count", {}),
    ("sdqueue_batch_images_sum", {}),
    ("sdqueue_job_duration_seconds_count", {"phase": "generate"}),
]


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_redelivery_returns_the_committed_manifest_without_generating() -> None:
    """A start that is not the first (redelivery, duplicate copy, retry) reads the manifest first."""
    run = runner()
    first = run.run(item(Txt2ImgJob(**GOOD, seed=1), "j3"), JobContext())
    again = run.run(item(Txt2ImgJob(**GOOD, seed=1), "j3"), JobContext(maybe_done=True))
    assert again == first and len(run.executor.requests) == 1  # type: ignore[attr-defined]


def test_a_bulk_first_start_reads_the_manifest_before_it_queues() -> None:
    """A bulk rerun of finished jobs (new messages, first starts) costs no GPU time."""
    run = runner()
    first = run.run(item(Txt2ImgJob(**GOOD, seed=1), "j3b", BULK_QUEUE), JobContext())
    again = run.run(item(Txt2ImgJob(**GOOD, seed=1), "j3b", BULK_QUEUE), JobContext(first_start=True))
    assert again == first and len(run.executor.requests) == 1  # type: ignore[attr-defined]


def test_an_interactive_first_start_finding_a_manifest_withdraws_its_request() -> None:
    """An interactive first start queues at once, its manifest read beside it; once the read finds
    an earlier run's manifest the request reads as cancelled (queued: dropped; running: stopped
    at its next step)."""
    run = runner()
    first = run.run(item(Txt2ImgJob(**GOOD, seed=1), "j3i"), JobContext())
    again = run.run(item(Txt2ImgJob(**GOOD, seed=1), "j3i"), JobContext(first_start=True))
    original, repeat = run.executor.requests  # type: ignore[attr-defined]
    assert again == first
    assert repeat.cancelled() and not original.cancelled()


def test_an_interactive_first_start_is_not_withdrawn_when_no_manifest_exists() -> None:
    run = runner()
    result = run.run(item(Txt2ImgJob(**GOOD, seed=1), "j3n"), JobContext(first_start=True))
    [request] = run.executor.requests  # type: ignore[attr-defined]
    assert not request.cancelled() and result["job_id"] == "j3n"


def test_a_second_writer_returns_the_first_manifest() -> None:
    """maybe_done False skips the read; the conditional manifest write then finds the first."""
    run = runner()
    first = run.run(item(Txt2ImgJob(**GOOD, seed=1), "j4"), JobContext())
    time.sleep(0.01)
    second = run.run(item(Txt2ImgJob(**GOOD, seed=1), "j4"), JobContext(maybe_done=False))
    assert len(run.executor.requests) == 2  # type: ignore[attr-defined]
    assert second == first
    assert (
        json.loads(run.storage.objects[("sdqueue", "outputs/j4/manifest.json")][0])["timings"]
        == first["timings"]
    )  # type: ignore[attr-defined]


def test_img2img_fetches_fits_and_records_its_input() -> None:
    run = runner()
    buffer = io.BytesIO()
    Image.new("RGB", (128, 96), (10, 200, 30)).save(buffer, format="PNG")
    data = buffer.getvalue()
    run.storage.objects[("inputs", "in/a.png")] = (data, {})  # type: ignore[attr-defined]
    job = Img2ImgJob(prompt="p", image_url="s3://inputs/in/a.png", width=64, height=64, steps=4)
    result = run.run(item(job.model_copy(update={"image_url": PATH_STYLE}), "j5"), JobContext())
    [request] = run.executor.requests  # type: ignore[attr-defined]
    assert request.init_image is not None and request.init_image.size == (64, 64)
    assert request.init_image.getpixel((32, 32)) == (10, 200, 30)
    manifest = json.loads(run.storage.objects[("sdqueue", "outputs/j5/manifest.json")][0])  # type: ignore[attr-defined]
    assert manifest["input"] == {
        "url": "s3://inputs/in/a.png",
        "etag": "etag-1",
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert 0 <= result["timings"]["input_fetch_s"] < 60 and manifest["mode"] == "img2img"


def test_result_from_manifest_keeps_what_a_client_needs() -> None:
    manifest = {
        "job_id": "j",
        "mode": "txt2img",
        "images": [1],
        "seeds": [2],
        "manifest_url": "u",
        "timings": {"t": 1},
        "model": {"id": "m"},
        "extra": 0,
    }
    assert result_from_manifest(manifest) == {
        "job_id": "j",
        "mode": "txt2img",
        "images": [1],
        "seeds": [2],
        "manifest_url": "u",
        "timings": {"t": 1},
        "model_id": "m",
    }


def test_a_failed_manifest_read_withdraws_the_interactive_request_and_raises() -> None:
    """A transient storage fault on the side read fails the delivery (it retries) and the request
    already queued for the GPU is withdrawn, so no image is stored for an attempt that failed."""
    run = runner()

    def unreachable(ref: ObjectRef) -> None:
        raise StorageUnavailable(f"reading {ref.url}: connection refused")

    run.storage.read_json = unreachable  # type: ignore[method-assign]
    with pytest.raises(StorageUnavailable):
        run.run(item(Txt2ImgJob(**GOOD, seed=1), "j3f"), JobContext(first_start=True))
    [request] = run.executor.requests  # type: ignore[attr-defined]
    assert request.cancelled() and not run.storage.objects  # type: ignore[attr-defined]
