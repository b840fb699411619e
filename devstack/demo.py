"""``make demo``: the main job end to end on the embedded defaults.

Uses the Redis on 127.0.0.1:6379 if one listens (database 5), else starts one; starts moto's S3
server and one worker with the tiny model; uploads a sample input; runs one txt2img and one
img2img job through the queue; downloads the results into ./demo-output/; prints the S3 and
presigned URLs and the timings; stops what it started.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from devstack.services import ROOT, MotoServer, RedisServer, WorkerProcess, port_open, stack_env
from sdqueue import Img2ImgJob, SdQueue, Txt2ImgJob
from sdqueue.settings import Settings

OUTPUT = ROOT / "demo-output"


def sample_image(size: int = 256) -> bytes:
    """A simple picture: sky, sun, hills. PNG bytes."""
    image = Image.new("RGB", (size, size), (120, 170, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.6, size * 0.1, size * 0.85, size * 0.35), fill=(250, 220, 90))
    draw.polygon(
        [(0, size), (0, size * 0.6), (size * 0.4, size * 0.45), (size, size * 0.7), (size, size)],
        fill=(70, 140, 70),
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def redis_url(workdir: Path, started: list) -> str:  # type: ignore[type-arg]
    if port_open(6379):
        print("using the Redis already listening on 127.0.0.1:6379 (database 5)")
        return "redis://127.0.0.1:6379/5"
    server = RedisServer(workdir).start()
    started.append(server)
    print(f"started redis-server on port {server.port}")
    return server.url


def run_jobs(queue: SdQueue) -> list[tuple[str, object]]:
    storage = queue.storage.client
    storage.put_object(Bucket="sdqueue", Key="inputs/demo-landscape.png", Body=sample_image())
    txt = queue.submit(
        Txt2ImgJob(prompt="a lighthouse at dusk", width=128, height=128, steps=20, seed=42, num_images=2)
    )
    img = queue.submit(
        Img2ImgJob(
            prompt="the same landscape in autumn",
            image_url="s3://sdqueue/inputs/demo-landscape.png",
            width=128,
            height=128,
            steps=20,
            strength=0.3,
            seed=42,
        )
    )
    print(f"submitted txt2img {txt.job_id} and img2img {img.job_id}; waiting...")
    return [("txt2img", txt.wait(timeout=300)), ("img2img", img.wait(timeout=300))]


def report(queue: SdQueue, results: list) -> None:  # type: ignore[type-arg]
    OUTPUT.mkdir(exist_ok=True)
    for mode, result in results:
        urls = queue.presigned_urls(result, expires_s=3600)
        print(f"\n{mode} job {result.job_id}: manifest {result.manifest_url}")
        for image, http_url in zip(result.images, urls, strict=False):
            local = OUTPUT / f"{mode}-{image.index}.png"
            local.write_bytes(
                queue.storage.client.get_object(Bucket=image.bucket, Key=image.key)["Body"].read()
            )
            print(
                f"  image {image.index} seed {image.seed}: {image.url}\n    -> {local.relative_to(ROOT)}"
                f"\n    presigned: {http_url[:100]}..."
            )
        print("  timings: " + json.dumps({k: round(v, 3) for k, v in result.timings.items()}))


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sdqueue-demo-"))
    started: list = []  # type: ignore[type-arg]
    try:
        url = redis_url(workdir, started)
        moto = MotoServer(workdir).start()
        started.append(moto)
        # a demo redis keeps nothing on disk: the worker is told that this is accepted
        env = stack_env(
            url, moto.url, str(ROOT / ".cache" / "tiny-sd"), device="cpu", accept_volatile_broker="true"
        )
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        queue = SdQueue(Settings(redis_url=url, s3_endpoint_url=moto.url, input_buckets=["sdqueue"]))
        queue.storage.client.create_bucket(Bucket="sdqueue")
        began = time.perf_counter()
        worker = WorkerProcess(workdir, env, name="demo").start()
        started.append(worker)
        print(f"worker ready in {time.perf_counter() - began:.1f}s (tiny model: images are noise)")
        report(queue, run_jobs(queue))
        print(f"\nresults in {OUTPUT.relative_to(ROOT)}/; logs in {workdir}")
        return 0
    finally:
        for service in reversed(started):
            service.stop()


if __name__ == "__main__":
    sys.exit(main())
