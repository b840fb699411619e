"""The model runtime observed from outside: which module objects the pipelines really call, in
which dtype, and the start-up sharing check against the two ways sharing breaks.

The worker's runtime, GPU thread and job runner run in this process (real tiny model, real
moto S3); a global forward hook records every module call, so nothing here reads a counter or a
field the runtime writes about itself.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from diffusers import AutoPipelineForImage2Image

from sdqueue import Img2ImgJob, Txt2ImgJob
from sdqueue.errors import StartupError
from sdqueue.locations import ObjectRef
from sdqueue.names import IMG2IMG_TASK, TXT2IMG_TASK
from sdqueue_worker.executor import GpuExecutor
from sdqueue_worker.generation import run_batch
from sdqueue_worker.jobs import JobContext, JobRunner
from sdqueue_worker.runtime import Runtime, check_shared, load_runtime
from sdqueue_worker.settings import WorkerSettings
from sdqueue_worker.storage import WorkerStorage
from sdqueue_worker.work import parse_message
from tests.helpers import png_bytes, smooth_image

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def settings(env: dict[str, str], tiny_model: str) -> WorkerSettings:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        os.environ[key] = env[key]
    return WorkerSettings(
        model=tiny_model,
        device="cpu",
        s3_endpoint_url=env["SDQ_S3_ENDPOINT_URL"],
        input_buckets=["inputs"],
        max_batch=4,
        warmup=False,
    )


@pytest.fixture(scope="module")
def runtime(settings: WorkerSettings) -> Runtime:
    return load_runtime(settings)


@contextmanager
def module_calls() -> Iterator[list[tuple[torch.nn.Module, set[torch.dtype]]]]:
    """Every nn.Module forward call in this process while open: (module, its parameter dtypes)."""
    calls: list[tuple[torch.nn.Module, set[torch.dtype]]] = []

    def record(module: torch.nn.Module, _args: Any, _out: Any) -> None:
        calls.append((module, {p.dtype for p in module.parameters(recurse=False)}))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        yield calls
    finally:
        handle.remove()


def test_every_mode_calls_the_modules_loaded_once(runtime: Runtime, settings: WorkerSettings, s3) -> None:  # type: ignore[no-untyped-def]
    """txt2img and img2img jobs, alone and batched, through the real runner and GPU thread: every
    module called belongs to the components loaded at start-up, in the runtime's dtype; only
    img2img jobs run the VAE encoder, and the manifest names the pipeline that ran."""
    key = f"runtime/{uuid.uuid4().hex[:8]}.png"
    s3.put_object(Bucket="inputs", Key=key, Body=png_bytes(smooth_image(4)))
    executor = GpuExecutor(functools.partial(run_batch, runtime), settings.max_batch, 0.05, time_limit_s=120)
    executor.start()
    runner = JobRunner(settings, runtime, executor, WorkerStorage(settings), hostname="in-process")
    loaded = {id(m) for name in COMPONENTS for m in getattr(runtime.txt2img, name).modules()}
    encoder = {id(m) for m in runtime.txt2img.vae.encoder.modules()}
    jobs: list[Txt2ImgJob | Img2ImgJob] = [
        Txt2ImgJob(prompt="t", width=64, height=64, steps=2, seed=1),
        Txt2ImgJob(prompt="t", width=64, height=64, steps=2, seed=1, num_images=2),
        Img2ImgJob(prompt="i", image_url=f"s3://inputs/{key}", width=64, height=64, steps=4, seed=2),
        Img2ImgJob(prompt="i", image_url=f"s3://inputs/{key}", width=64, height=64, steps=4, num_images=3),
    ]
    try:
        pipelines = {}
        for job in jobs:
            with module_calls() as calls:
                payload = job.model_dump(mode="json", exclude={"mode"})
                task = TXT2IMG_TASK if job.mode == "txt2img" else IMG2IMG_TASK
                item = parse_message(task, f"rt-{uuid.uuid4().hex[:8]}", [], payload, None, settings)
                result = runner.run(item, JobContext(maybe_done=False))
            manifest = runner.storage.read_json(ObjectRef(*result["manifest_url"][5:].split("/", 1)))
            assert manifest is not None
            called = {id(module) for module, _ in calls}
            strangers = [type(m).__name__ for m, _ in calls if id(m) not in loaded]
            assert not strangers, (
                f"{job.mode} called modules that were not loaded at start-up: {strangers[:5]}"
            )
            assert {d for _, dtypes in calls for d in dtypes} == {runtime.dtype}
            for name in COMPONENTS:  # each component ran (the VAE through decode(), not its forward)
                assert called & {id(m) for m in getattr(runtime.txt2img, name).modules()}, name
            assert bool(called & encoder) == (job.mode == "img2img"), "only img2img encodes its input"
            pipelines[job.mode] = manifest["model"]["pipeline"]
    finally:
        executor.stop()
    assert pipelines == {
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
    }
    print(f"{len(jobs)} jobs of both modes: every module called was loaded at start-up, all {runtime.dtype}")


def test_check_shared_refuses_a_copied_module(runtime: Runtime, settings: WorkerSettings) -> None:
    copy = AutoPipelineForImage2Image.from_pretrained(settings.model, safety_checker=None)
    check_shared(runtime.txt2img, runtime.img2img, runtime.dtype)  # the real pair passes
    with pytest.raises(StartupError, match="does not share unet"):
        check_shared(runtime.txt2img, copy, runtime.dtype)
    copy.unet = runtime.txt2img.unet
    with pytest.raises(StartupError, match="does not share vae"):
        check_shared(runtime.txt2img, copy, runtime.dtype)


def test_check_shared_refuses_a_dtype_cast(settings: WorkerSettings) -> None:
    """diffusers#12754: building img2img may cast the shared modules back to float32."""
    from diffusers import AutoPipelineForText2Image

    txt2img = AutoPipelineForText2Image.from_pretrained(
        settings.model, dtype=torch.float16, safety_checker=None
    )
    img2img = AutoPipelineForImage2Image.from_pipe(txt2img)
    assert txt2img.unet.dtype == torch.float16  # (this diffusers keeps the tiny VAE in float32)
    img2img.unet.to(torch.float32)  # the same object: txt2img's UNet is cast too
    with pytest.raises(
        StartupError,
        match="unet is torch.float32 after building StableDiffusionImg2ImgPipeline, expected torch.float16",
    ):
        check_shared(txt2img, img2img, torch.float16)
