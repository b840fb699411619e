"""Several models behind one queue system: each job goes to the workers of its model alias."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devstack.services import MotoServer, WorkerProcess
from sdqueue import JobValidationError, Txt2ImgJob
from sdqueue.names import lane_queue
from tests.helpers import manifest_of, own_stack


def second_tiny_model(tiny_model: str, folder: Path) -> str:
    """The tiny model with a differently seeded UNet: another model of the same family."""
    from diffusers import UNet2DConditionModel

    target = folder / "tiny-b"
    shutil.copytree(tiny_model, target)
    unet = UNet2DConditionModel.from_pretrained(str(target), subfolder="unet")
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    shutil.rmtree(target / "unet")
    unet.save_pretrained(str(target / "unet"))
    return str(target)


def pixels(s3, result) -> np.ndarray:  # type: ignore[no-untyped-def]
    body = s3.get_object(Bucket=result.images[0].bucket, Key=result.images[0].key)["Body"].read()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=int)


def test_each_job_runs_on_the_worker_of_its_model(
    logdir: Path, moto: MotoServer, s3, tiny_model: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    model_b = second_tiny_model(tiny_model, tmp_path)
    with own_stack(logdir, moto.url, tiny_model, "model-a", model_alias="sd-a", models="sd-a,sd-b") as stack:
        assert stack.worker is not None
        env_b = {**stack.env, "SDQ_MODEL": model_b, "SDQ_MODEL_ALIAS": "sd-b"}
        worker_b = WorkerProcess(logdir, env_b, name="model-b").start(timeout=240)
        try:
            spec = dict(prompt="a harbour", width=64, height=64, steps=3, seed=4)
            handles = {
                alias: [
                    stack.queue.submit(Txt2ImgJob(model=alias, **spec), lane=lane)
                    for lane in ("interactive", "bulk")
                ]
                for alias in ("sd-a", "sd-b")
            }
            with pytest.raises(
                JobValidationError, match="unknown model alias 'sd-c'; known aliases: sd-a, sd-b"
            ):
                stack.queue.submit(Txt2ImgJob(model="sd-c", **spec))
            hostnames = {"sd-a": stack.worker.hostname, "sd-b": worker_b.hostname}
            models = {"sd-a": tiny_model, "sd-b": model_b}
            images = {}
            for alias, pair in handles.items():
                for handle in pair:
                    result = handle.wait(timeout=240)
                    manifest = manifest_of(s3, result)
                    assert manifest["model"]["alias"] == alias and manifest["model"]["id"] == models[alias]
                    assert manifest["worker"]["hostname"] == hostnames[alias]
                    images[alias] = pixels(s3, result)
            assert np.abs(images["sd-a"] - images["sd-b"]).mean() > 2, "two models, two pictures"
            assert all(
                stack.queue.redis.llen(lane_queue(lane, alias)) == 0
                for lane in ("interactive", "bulk")
                for alias in hostnames
            )
        finally:
            worker_b.stop()
