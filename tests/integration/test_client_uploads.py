"""Client parity with the front door: ``SdQueue.upload_input``, ``sdqueue submit img2img --image``,
``AsyncSdQueue``, and the help examples' URLs accepted under the default settings."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from devstack.services import WorkerProcess
from sdqueue import AsyncSdQueue, InputImageError, SdQueue, Settings, Txt2ImgJob
from sdqueue.cli import EPILOG, build_parser
from tests.helpers import png_bytes, sdqueue, smooth_image


def test_upload_input_checks_then_stores_content_addressed(queue: SdQueue, s3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = png_bytes(smooth_image(7))
    url = queue.upload_input(data)
    assert re.fullmatch(r"s3://sdqueue/uploads/[0-9a-f]{64}\.png", url)
    path = tmp_path / "in.png"
    path.write_bytes(data)
    assert queue.upload_input(path) == url
    bucket, key = url.removeprefix("s3://").split("/", 1)
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    with pytest.raises(InputImageError, match="not a PNG, JPEG or WebP"):
        queue.upload_input(b"GIF89a" + b"\0" * 32)


def test_submit_img2img_image_uploads_first(
    env: dict[str, str], worker: WorkerProcess, tmp_path: Path
) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(smooth_image(8)))
    args = ("submit", "img2img", "as a watercolour", "--image", str(path), "--width", "64", "--height", "64")
    out = sdqueue(env, *args, "--steps", "4", "--strength", "0.5", "--wait", "--timeout", "120")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["state"] == "succeeded" and body["images"][0]["http_url"].startswith("http")


def test_async_client_submits_and_waits(queue: SdQueue, worker: WorkerProcess) -> None:
    async def run() -> tuple[str, int]:
        aq = AsyncSdQueue(queue=queue)
        handle = await aq.submit(Txt2ImgJob(prompt="a boat", width=64, height=64, steps=2, seed=3))
        result = await handle.wait(timeout=120)
        urls = await aq.presigned_urls(result)
        return str(await handle.state()), len(urls)

    state, urls = asyncio.run(run())
    assert state.endswith("succeeded") and urls == 1


def test_help_examples_pass_validation_with_default_settings() -> None:
    """Every s3:// URL the help shows is in the default input allow-list (SDQ_INPUT_BUCKETS=sdqueue)."""
    parser = build_parser()
    texts = [EPILOG] + [p.epilog or "" for p in parser._subparsers._group_actions[0].choices.values()]  # type: ignore[union-attr]
    urls = {u for t in texts for u in re.findall(r"s3://[\w./-]+", t)}
    assert urls
    defaults = SdQueue(Settings())
    for url in urls:
        job = {"mode": "img2img", "prompt": "x", "image_url": url}
        assert defaults.validate(job).image_url == url  # type: ignore[union-attr]
