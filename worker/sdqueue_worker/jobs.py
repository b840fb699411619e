"""What a task thread does with one job: validate, fetch, generate, store, commit.

Runs inside a Celery task thread; the model work itself happens on the GPU thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sdqueue.contract import AnyJob, Img2ImgJob
from sdqueue.errors import JobValidationError, StorageRefused
from sdqueue.locations import ObjectRef
from sdqueue_worker.defaults import native_side, size_of, with_model_size
from sdqueue_worker.executor import GpuExecutor
from sdqueue_worker.formats import OutputEncoding, encoding_for
from sdqueue_worker.generation import GenerationRequest, ProgressFn
from sdqueue_worker.images import decode_input_image, fit_to
from sdqueue_worker.masks import decode_mask
from sdqueue_worker.metrics import observe_job
from sdqueue_worker.prompts import PromptCounter
from sdqueue_worker.runtime import Runtime
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.storage import WorkerStorage
from sdqueue_worker.work import WorkItem

Job = AnyJob
SIDE_THREADS = 4
"""Threads for manifest reads, and for the uploads of a job's several images."""


@dataclass
class JobContext:
    """Per-delivery facts the task layer hands to the runner (the job itself is the WorkItem)."""

    submitted_at: float | None = None
    on_progress: ProgressFn | None = None
    is_cancelled: Any = None
    maybe_done: bool = True
    """Look for the job's manifest (the task layer always does: a resubmit after the result TTL, a
    redelivery). The job waits for that S3 read before it queues for the GPU, so a rerun of
    finished jobs costs no GPU time, except a ``first_start`` interactive job: it queues at once
    and the read runs beside its generation, off its latency (a manifest found withdraws it at
    its next step). False skips the read; a duplicate then still meets the conditional manifest
    write."""
    first_start: bool = False
    """The first start of this job id's first attempt (no redelivery, duplicate copy or retry:
    those are the starts that find a manifest)."""


def _or_set(event: threading.Event, is_cancelled: Callable[[], bool] | None) -> Callable[[], bool]:
    return lambda: event.is_set() or bool(is_cancelled and is_cancelled())


class JobRunner:
    """Turns a validated job into stored images and a manifest, idempotently."""

    def __init__(
        self,
        settings: WorkerSettings,
        runtime: Runtime,
        executor: GpuExecutor,
        storage: WorkerStorage,
        hostname: str | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.executor = executor
        self.storage = storage
        self.hostname = hostname or socket.gethostname()
        self._prompts: PromptCounter | None = None
        self._lookups = ThreadPoolExecutor(SIDE_THREADS, thread_name_prefix="sdq-manifest")
        self._uploads = ThreadPoolExecutor(SIDE_THREADS, thread_name_prefix="sdq-upload")

    def prompts(self) -> PromptCounter:
        """The prompt token counter, built on first use from the runtime's tokenizers."""
        if self._prompts is None:
            self._prompts = PromptCounter(self.runtime.txt2img)
        return self._prompts

    def run(self, item: WorkItem, ctx: JobContext) -> dict[str, Any]:
        started = time.time()
        beside = ctx.maybe_done and ctx.first_start and not item.lane_rank
        if ctx.maybe_done and not beside and (done := self.storage.read_json(item.manifest_ref)) is not None:
            return result_from_manifest(done)
        lookup = self._look_for_manifest(item) if beside else None
        item = replace(item, spec=with_model_size(item.spec, native_side(self.runtime.txt2img)))
        job = item.spec
        timings: dict[str, float] = {}
        prompt_length = self.prompts().measure(job.prompt, job.negative_prompt)
        loras = self._check_loras(job)
        withdrawn = threading.Event()
        with self.executor.preparing():
            init_image, mask_image, input_info = self._fetch_inputs(item, timings)
            request = self.executor.submit(
                GenerationRequest(
                    job=item.spec,
                    job_id=item.job_id,
                    seeds=list(item.seeds),
                    lane_rank=item.lane_rank,
                    init_image=init_image,
                    mask_image=mask_image,
                    prompt_chunks=prompt_length.chunks,
                    deadline=time.monotonic() + self.settings.job_time_limit_s,
                    on_progress=ctx.on_progress,
                    is_cancelled=ctx.is_cancelled if lookup is None else _or_set(withdrawn, ctx.is_cancelled),
                )
            )
        generate_started = time.perf_counter()
        done = self._manifest_found(lookup, withdrawn)
        if done is not None:
            return result_from_manifest(done)
        pixels: np.ndarray = request.future.result()
        timings["generate_s"] = time.perf_counter() - generate_started
        batch_size = request.batch_images
        nsfw = request.nsfw
        images = self._store_images(item, pixels, timings, ran_alone=batch_size <= len(item.seeds))
        if ctx.submitted_at:
            timings["queue_wait_s"] = max(0.0, started - ctx.submitted_at)
        timings["total_s"] = time.time() - started
        manifest = self._manifest(item, images, input_info, timings, batch_size, request.pipeline)
        manifest["prompt"] = prompt_length.describe()
        manifest["loras"] = loras
        if nsfw is not None:
            for image, flag in zip(manifest["images"], nsfw, strict=False):
                image["nsfw"] = flag
        manifest = self.commit_manifest(item, manifest, images)
        observe_job(item.mode, timings, batch_size)
        return result_from_manifest(manifest)

    def _look_for_manifest(self, item: WorkItem) -> Future[dict[str, Any] | None]:
        """Read the job's manifest on a side thread: for an interactive job the S3 round trip
        overlaps its generation instead of preceding it."""
        return self._lookups.submit(self.storage.read_json, item.manifest_ref)

    @staticmethod
    def _manifest_found(
        lookup: Future[dict[str, Any] | None] | None, withdrawn: threading.Event
    ) -> dict[str, Any] | None:
        """The manifest a finished earlier run left (its queued or running request is withdrawn:
        it stops at its next step), else None. A failed read withdraws it too, then raises."""
        if lookup is None:
            return None
        try:
            done = lookup.result()
        except BaseException:
            withdrawn.set()
            raise
        if done is not None:
            withdrawn.set()
        return done

    def commit_manifest(
        self, item: WorkItem, manifest: dict[str, Any], images: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Write the manifest (the commit marker) once. A refused write (permanent) removes the job's
        images, so no orphan stays; a transient fault leaves them for the retry to find."""
        body = json.dumps(manifest, indent=1).encode()
        try:
            written = self.storage.put_once(
                item.manifest_ref, body, "application/json", {"job-id": item.job_id}
            )
        except StorageRefused:
            if self.storage.read_json_quietly(item.manifest_ref) is None:
                self.storage.delete_quietly([ObjectRef(image["bucket"], image["key"]) for image in images])
            raise
        if not written:
            return self.storage.read_json(item.manifest_ref) or manifest
        return manifest

    def _fetch_inputs(
        self, item: WorkItem, timings: dict[str, float]
    ) -> tuple[Any, Any, dict[str, Any] | None]:
        """img2img/inpaint inputs fitted to the job's size: (image, mask or None, manifest info)."""
        spec, ref = item.spec, item.input_ref
        if not isinstance(spec, Img2ImgJob) or ref is None:
            return None, None, None
        began = time.perf_counter()
        data, info = self._read(ref)
        image = decode_input_image(data, self.settings.max_input_pixels, self.settings.max_jpeg_scans)
        mask = None
        if item.mask_ref is not None:
            mask_data, info["mask"] = self._read(item.mask_ref)
            mask = fit_to(decode_mask(mask_data, self.settings.max_input_pixels, image.size), *size_of(spec))
        timings["input_fetch_s"] = time.perf_counter() - began
        return fit_to(image, *size_of(spec)), mask, info

    def _check_loras(self, job: Job) -> list[dict[str, Any]]:
        """Each named adapter exists in the worker's folder and is a LoRA file (else a clear error)."""
        if not job.loras:
            return []
        if self.runtime.loras is None:
            raise JobValidationError("loras: this worker serves no LoRA adapters (SDQ_LORA_DIR is not set)")
        if self.runtime.loras.hot is not None and len(job.loras) > 1:
            raise JobValidationError("loras: with a compiled UNet (SDQ_COMPILE) a job may use one adapter")
        return self.runtime.loras.registry.describe(job.loras)

    def _read(self, ref: ObjectRef) -> tuple[bytes, dict[str, Any]]:
        data, etag = self.storage.read_input(ref)
        return data, {"url": ref.url, "etag": etag, "sha256": hashlib.sha256(data).hexdigest()}

    def _store_images(
        self, item: WorkItem, pixels: np.ndarray, timings: dict[str, float], ran_alone: bool
    ) -> list[dict[str, Any]]:
        """Encode and upload a job's images, several at a time (each a conditional write)."""
        began = time.perf_counter()
        encoding = encoding_for(item.spec, self.settings.png_compress_level, ran_alone)
        entries = list(enumerate(zip(item.seeds, pixels, strict=False)))
        if len(entries) == 1:
            images = [self._store_image(item, encoding, *entries[0])]
        else:
            images = list(self._uploads.map(lambda entry: self._store_image(item, encoding, *entry), entries))
        timings["encode_upload_s"] = time.perf_counter() - began
        return images

    def _store_image(
        self, item: WorkItem, encoding: OutputEncoding, index: int, seed_and_pixels: tuple[int, np.ndarray]
    ) -> dict[str, Any]:
        seed, image = seed_and_pixels
        job, folder = item.spec, item.folder
        ref = ObjectRef(folder.bucket, f"{folder.key}/{index}.{encoding.extension}")
        body = encoding.encode(image)
        self.storage.put_once(ref, body, encoding.content_type, {"job-id": item.job_id, "seed": str(seed)})
        return {
            "index": index,
            "seed": seed,
            "url": ref.url,
            "bucket": ref.bucket,
            "key": ref.key,
            "width": job.width,
            "height": job.height,
            "sha256": hashlib.sha256(body).hexdigest(),
            "format": encoding.format,
            "content_type": encoding.content_type,
        }

    def _manifest(
        self,
        item: WorkItem,
        images: list[dict[str, Any]],
        input_info: dict[str, Any] | None,
        timings: dict[str, float],
        batch_size: int,
        pipeline: str,
    ) -> dict[str, Any]:
        runtime = self.runtime
        job = item.spec
        return {
            "job_id": item.job_id,
            "mode": job.mode,
            "spec": job.model_dump(mode="json"),
            "seeds": list(item.seeds),
            "images": images,
            "input": input_info,
            "output_encoding": encoding_for(job, self.settings.png_compress_level).describe(),
            "manifest_url": item.manifest_ref.url,
            "model": {
                "alias": self.settings.model_alias,
                "id": runtime.model_id,
                "revision": self.settings.model_revision,
                "dtype": str(runtime.dtype).removeprefix("torch."),
                "device": runtime.device.type,
                "pipeline": pipeline,  # what run_batch called, not a lookup beside it
                "scheduler": type(runtime.schedulers[job.scheduler]).__name__,
                "fp8_unet": runtime.fp8_layers > 0,  # FP8 outputs differ from 16-bit ones
                "attention": runtime.attention,
            },
            "versions": runtime.versions,
            "timings": timings,
            "worker": {
                "hostname": self.hostname,
                "pid": os.getpid(),
                "model_load_count": runtime.load_count,
                "batch_images": batch_size,
                "thread": threading.current_thread().name,
            },
            "created_at": time.time(),
        }


def result_from_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The task's return value: small, JSON, enough for a client to find everything."""
    return {
        "job_id": manifest["job_id"],
        "mode": manifest["mode"],
        "images": manifest["images"],
        "seeds": manifest["seeds"],
        "manifest_url": manifest["manifest_url"],
        "timings": manifest["timings"],
        "model_id": manifest["model"]["id"],
    }
