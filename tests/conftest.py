"""Real services for the tests: a redis-server, moto's S3 server, worker processes, tiny model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from devstack.services import MotoServer, RedisServer, WorkerProcess, stack_env
from sdqueue.client import SdQueue
from tests.helpers import TINY_MODEL, settings_from


@pytest.fixture(scope="session")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from sdqueue_worker.tiny_model import build_tiny_model

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
    client = boto3.client(
        "s3",
        endpoint_url=moto.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for bucket in ("sdqueue", "inputs", "other"):
        client.create_bucket(Bucket=bucket)
    return client


@pytest.fixture(scope="session")
def env(redis_server: RedisServer, moto: MotoServer, tiny_model: str, s3) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return stack_env(redis_server.url, moto.url, tiny_model)


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
