"""Real services for the tests: a redis-server, moto's S3 server, worker processes, tiny model."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import boto3
import numpy as np
import pytest
from PIL import Image

from devstack.services import MotoServer, RedisServer, WorkerProcess, stack_env
from producer.client import SdQueue
from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / ".cache" / "tiny-sd"


@pytest.fixture(scope="session")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from worker.tiny_model import build_tiny_model

    return str(build_tiny_model(TINY_MODEL))


@pytest.fixture(scope="session")
def redis_server(logdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(logdir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto(logdir: Path) -> Iterator[MotoServer]:
    server = MotoServer(logdir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(moto: MotoServer):  # type: ignore[no-untyped-def]
    client = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    for bucket in ("sdqueue", "inputs", "other"):
        client.create_bucket(Bucket=bucket)
    return client


@pytest.fixture(scope="session")
def env(redis_server: RedisServer, moto: MotoServer, tiny_model: str, s3) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return stack_env(redis_server.url, moto.url, tiny_model)


def settings_from(env: dict[str, str]) -> Settings:
    return Settings(**{k[4:].lower(): v for k, v in env.items() if k.startswith("SDQ_") and k != "SDQ_READY_FILE"})


@pytest.fixture(scope="session")
def worker(logdir: Path, env: dict[str, str]) -> Iterator[WorkerProcess]:
    """One worker shared by the end-to-end tests (started once: the model loads once)."""
    process = WorkerProcess(logdir, env, name="shared").start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def queue(env: dict[str, str]) -> SdQueue:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        os.environ[key] = env[key]
    return SdQueue(settings_from(env))


def png_bytes(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A smooth colour field like those the tiny VAE reconstructs well."""
    import torch

    from worker.tiny_model import smooth_images

    tensor = smooth_images(1, size, torch.Generator().manual_seed(seed))[0]
    return Image.fromarray(((tensor.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))


def read_png(s3, bucket: str, key: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
