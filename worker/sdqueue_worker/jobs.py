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
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdqueue.contract import AnyJob, Img2ImgJob, InpaintJob, derived_seed, parse_job
from sdqueue.errors import JobValidationError
from sdqueue.locations import ObjectRef, allowed_input, job_folder
from sdqueue.locations import manifest_ref as manifest_location
from sdqueue.webhooks import check_webhook_url
from sdqueue_worker.defaults import native_side, size_of, with_model_size
from sdqueue_worker.executor import GpuExecutor
from sdqueue_worker.formats import encoding_for
from sdqueue_worker.generation import GenerationRequest, ProgressFn
from sdqueue_worker.images import decode_input_image, fit_to
from sdqueue_worker.masks import decode_mask
from sdqueue_worker.metrics import observe_job
from sdqueue_worker.prompts import PromptCounter
from sdqueue_worker.runtime import Runtime
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.storage import WorkerStorage

Job = AnyJob


@dataclass
class JobContext:
    """Per-delivery facts the task layer hands to the runner."""

    job_id: str
    lane_rank: int = 0
    submitted_at: float | None = None
    on_progress: ProgressFn | None = None
    is_cancelled: Any = None
    maybe_done: bool = True
    """Look for the job's manifest before generating (the task layer always does: a resubmit after
    the result TTL, a redelivery). False skips that S3 read; a duplicate then still meets the
    conditional manifest write."""


def validate_payload(mode: str, payload: dict[str, Any], job_id: str, settings: WorkerSettings) -> Job:
    """The worker-side check of the contract (a raw Celery client may bypass the producer)."""
    if "mode" in payload and payload["mode"] != mode:
        raise JobValidationError(f"mode: {payload['mode']!r} sent to the {mode} task")
    job = parse_job({**payload, "mode": mode})
    if job.job_id is not None and job.job_id != job_id:
        raise JobValidationError(
            f"job_id: {job.job_id!r} differs from the task id {job_id!r}; send them equal"
        )
    if job.output is not None and job.output.bucket not in settings.allowed_output_buckets:
        raise JobValidationError(
            f"output.bucket: {job.output.bucket!r} is not an allowed output bucket "
            f"({', '.join(settings.allowed_output_buckets)})"
        )
    if isinstance(job, Img2ImgJob):
        allowed_input(job.image_url, settings.s3_endpoint_url, settings.input_buckets)
    if isinstance(job, InpaintJob):
        allowed_input(job.mask_url, settings.s3_endpoint_url, settings.input_buckets)
    if job.webhook_url is not None:
        check_webhook_url(job.webhook_url, settings.webhook_hosts)
    if job.model != settings.model_alias:
        raise JobValidationError(
            f"model: this worker serves {settings.model_alias or 'the default model'}, the job names "
            f"{job.model or 'no model'}; submit through the client, which routes by alias"
        )
    return job


def job_seeds(job: Job, job_id: str) -> list[int]:
    """Seed of each image: the job's seed (or one derived from its id) plus the image index."""
    base = job.seed if job.seed is not None else derived_seed(job_id)
    return [(base + index) % (2**63) for index in range(job.num_images)]


def output_dir(job: Job, job_id: str, settings: WorkerSettings) -> ObjectRef:
    bucket = job.output.bucket if job.output else settings.output_bucket
    prefix = job.output.prefix if job.output else settings.output_prefix
    return job_folder(bucket, prefix, job_id)


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
        self.prompts = PromptCounter(runtime.txt2img)
        self.native_side = native_side(runtime.txt2img)

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        started = time.time()
        folder = output_dir(job, ctx.job_id, self.settings)
        manifest_ref = manifest_location(folder)
        existing = self.storage.read_json(manifest_ref) if ctx.maybe_done else None
        if existing is not None:
            return result_from_manifest(existing)
        job = with_model_size(job, self.native_side)
        seeds = job_seeds(job, ctx.job_id)
        timings: dict[str, float] = {}
        prompt_length = self.prompts.measure(job.prompt, job.negative_prompt)
        loras = self._check_loras(job)
        with self.executor.preparing():
            init_image, mask_image, input_info = self._fetch_inputs(job, timings)
            request = self.executor.submit(
                GenerationRequest(
                    job=job,
                    job_id=ctx.job_id,
                    seeds=seeds,
                    lane_rank=ctx.lane_rank,
                    init_image=init_image,
                    mask_image=mask_image,
                    prompt_chunks=prompt_length.chunks,
                    deadline=time.monotonic() + self.settings.job_time_limit_s,
                    on_progress=ctx.on_progress,
                    is_cancelled=ctx.is_cancelled,
                )
            )
        generate_started = time.perf_counter()
        pixels: np.ndarray = request.future.result()
        timings["generate_s"] = time.perf_counter() - generate_started
        batch_size = request.batch_images
        nsfw = request.nsfw
        images = self._store_images(job, ctx.job_id, folder, seeds, pixels, timings)
        if ctx.submitted_at:
            timings["queue_wait_s"] = max(0.0, started - ctx.submitted_at)
        timings["total_s"] = time.time() - started
        manifest = self._manifest(
            job, ctx.job_id, seeds, images, input_info, timings, batch_size, manifest_ref
        )
        manifest["prompt"] = prompt_length.describe()
        manifest["loras"] = loras
        if nsfw is not None:
            for image, flag in zip(manifest["images"], nsfw, strict=False):
                image["nsfw"] = flag
        if not self.storage.put_once(
            manifest_ref, json.dumps(manifest, indent=1).encode(), "application/json", {"job-id": ctx.job_id}
        ):
            manifest = self.storage.read_json(manifest_ref) or manifest
        observe_job(job.mode, timings, batch_size)
        return result_from_manifest(manifest)

    def _fetch_inputs(self, job: Job, timings: dict[str, float]) -> tuple[Any, Any, dict[str, Any] | None]:
        """img2img/inpaint inputs fitted to the job's size: (image, mask or None, manifest info)."""
        if not isinstance(job, Img2ImgJob):
            return None, None, None
        began = time.perf_counter()
        data, info = self._read(job.image_url)
        image = decode_input_image(data, self.settings.max_input_pixels)
        mask = None
        if isinstance(job, InpaintJob):
            mask_data, info["mask"] = self._read(job.mask_url)
            mask = fit_to(decode_mask(mask_data, self.settings.max_input_pixels, image.size), *size_of(job))
        timings["input_fetch_s"] = time.perf_counter() - began
        return fit_to(image, *size_of(job)), mask, info

    def _check_loras(self, job: Job) -> list[dict[str, Any]]:
        """Each named adapter exists in the worker's folder and is a LoRA file (else a clear error)."""
        if not job.loras:
            return []
        if self.runtime.loras is None:
            raise JobValidationError("loras: this worker serves no LoRA adapters (SDQ_LORA_DIR is not set)")
        if self.runtime.loras.hot is not None and len(job.loras) > 1:
            raise JobValidationError("loras: with a compiled UNet (SDQ_COMPILE) a job may use one adapter")
        return self.runtime.loras.registry.describe(job.loras)

    def _read(self, url: str) -> tuple[bytes, dict[str, Any]]:
        ref = allowed_input(url, self.settings.s3_endpoint_url, self.settings.input_buckets)
        data, etag = self.storage.read_input(ref)
        return data, {"url": ref.url, "etag": etag, "sha256": hashlib.sha256(data).hexdigest()}

    def _store_images(
        self,
        job: Job,
        job_id: str,
        folder: ObjectRef,
        seeds: list[int],
        pixels: np.ndarray,
        timings: dict[str, float],
    ) -> list[dict[str, Any]]:
        began = time.perf_counter()
        encoding = encoding_for(job, self.settings.png_compress_level)
        images = []
        for index, (seed, image) in enumerate(zip(seeds, pixels, strict=False)):
            ref = ObjectRef(folder.bucket, f"{folder.key}/{index}.{encoding.extension}")
            body = encoding.encode(image)
            self.storage.put_once(ref, body, encoding.content_type, {"job-id": job_id, "seed": str(seed)})
            images.append(
                {
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
            )
        timings["encode_upload_s"] = time.perf_counter() - began
        return images

    def _manifest(
        self,
        job: Job,
        job_id: str,
        seeds: list[int],
        images: list[dict[str, Any]],
        input_info: dict[str, Any] | None,
        timings: dict[str, float],
        batch_size: int,
        manifest_ref: ObjectRef,
    ) -> dict[str, Any]:
        runtime = self.runtime
        pipe = runtime.pipeline_for(job.mode)
        return {
            "job_id": job_id,
            "mode": job.mode,
            "spec": job.model_dump(mode="json"),
            "seeds": seeds,
            "images": images,
            "input": input_info,
            "output_encoding": encoding_for(job, self.settings.png_compress_level).describe(),
            "manifest_url": manifest_ref.url,
            "model": {
                "alias": self.settings.model_alias,
                "id": runtime.model_id,
                "revision": self.settings.model_revision,
                "dtype": str(runtime.dtype).removeprefix("torch."),
                "device": runtime.device.type,
                "pipeline": type(pipe).__name__,
                "scheduler": type(runtime.schedulers[job.scheduler]).__name__,
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
