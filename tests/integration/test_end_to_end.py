"""txt2img and img2img through the real queue: Redis, a worker process, moto S3, tiny model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sdqueue import Img2ImgJob, SdQueue, Txt2ImgJob
from tests.helpers import manifest_of, png_bytes, read_png, smooth_image

pytestmark = pytest.mark.usefixtures("worker")


def upload(s3, key: str, image) -> str:  # type: ignore[no-untyped-def]
    s3.put_object(Bucket="inputs", Key=key, Body=png_bytes(image))
    return f"s3://inputs/{key}"


def test_txt2img_writes_pngs_and_a_complete_manifest(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    handle = queue.submit(Txt2ImgJob(prompt="a red fox", width=64, height=80, steps=4, num_images=2, seed=11))
    result = handle.wait(timeout=120)
    assert [img.key for img in result.images] == [
        f"outputs/{handle.job_id}/0.png",
        f"outputs/{handle.job_id}/1.png",
    ]
    assert [img.seed for img in result.images] == [11, 12]
    for img in result.images:
        assert read_png(s3, img.bucket, img.key).shape == (80, 64, 3)
    manifest = manifest_of(s3, result)
    assert manifest["spec"]["prompt"] == "a red fox" and manifest["seeds"] == [11, 12]
    assert manifest["model"]["pipeline"] == "StableDiffusionPipeline"
    assert set(manifest["versions"]) == {"torch", "diffusers", "transformers"}
    assert {"generate_s", "encode_upload_s", "total_s", "queue_wait_s"} <= set(manifest["timings"])
    assert handle.state() == "succeeded"


def test_presigned_urls_serve_the_image(queue: SdQueue) -> None:
    import urllib.request

    result = queue.submit(Txt2ImgJob(prompt="p", width=64, height=64, steps=2, seed=1)).wait(timeout=120)
    url = queue.presigned_urls(result, expires_s=60)[0]
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"


def test_img2img_uses_its_input_image(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    first, second = smooth_image(101), smooth_image(202)
    url_a, url_b = upload(s3, "e2e/a.png", first), upload(s3, "e2e/b.png", second)
    common = dict(prompt="same prompt", width=64, height=64, steps=20, strength=0.15, seed=5)
    out_a = queue.submit(Img2ImgJob(image_url=url_a, **common)).wait(timeout=120)
    out_b = queue.submit(Img2ImgJob(image_url=url_b, **common)).wait(timeout=120)
    pixels_a = read_png(s3, "sdqueue", out_a.images[0].key)
    pixels_b = read_png(s3, "sdqueue", out_b.images[0].key)
    input_a = np.asarray(first, dtype=np.float32) / 255
    input_b = np.asarray(second, dtype=np.float32) / 255
    near, far = np.abs(pixels_a - input_a).mean(), np.abs(pixels_a - input_b).mean()
    print(f"img2img at strength 0.15: |out-in| {near:.3f}, |out-other input| {far:.3f}")
    assert near < 0.15 and near < far / 2
    assert np.abs(pixels_a - pixels_b).mean() > 0.05
    assert manifest_of(s3, out_a)["model"]["pipeline"] == "StableDiffusionImg2ImgPipeline"


def test_same_seed_same_pixels_different_seed_different_pixels(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    spec = dict(prompt="a teapot", width=64, height=64, steps=4)
    runs = [queue.submit(Txt2ImgJob(seed=seed, **spec)).wait(timeout=120) for seed in (3, 3, 4)]
    same_a, same_b, other = (read_png(s3, "sdqueue", r.images[0].key) for r in runs)
    assert np.array_equal(same_a, same_b)
    assert np.abs(same_a - other).mean() > 0.01


def documented_seed(job_id: str) -> int:
    """The derivation as documented (docs/testing.md), written out here, not imported."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") & (2**53 - 1)


def test_seed_is_derived_from_the_job_id_when_absent(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    spec = dict(prompt="no seed", width=64, height=64, steps=2, num_images=2)
    handle = queue.submit(Txt2ImgJob(**spec))
    result = handle.wait(timeout=120)
    base = documented_seed(handle.job_id)
    assert [image.seed for image in result.images] == [base, (base + 1) % 2**63]
    again = queue.submit(Txt2ImgJob(**spec, seed=base)).wait(timeout=120)
    for first, second in zip(result.images, again.images, strict=True):
        assert np.array_equal(read_png(s3, "sdqueue", first.key), read_png(s3, "sdqueue", second.key))


def test_path_style_endpoint_urls_are_accepted_inputs(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    """``http(s)://<endpoint>/bucket/key`` (as MinIO serves) reads the same object as s3://."""
    upload(s3, "e2e/path style.png", smooth_image(33))
    endpoint = queue.settings.s3_endpoint_url
    assert endpoint is not None
    common = dict(prompt="path style", width=64, height=64, steps=10, strength=0.5, seed=8)
    by_s3 = queue.submit(Img2ImgJob(image_url="s3://inputs/e2e/path style.png", **common)).wait(timeout=120)
    by_http = queue.submit(Img2ImgJob(image_url=f"{endpoint}/inputs/e2e/path%20style.png", **common))
    result = by_http.wait(timeout=120)
    assert manifest_of(s3, result)["input"]["url"] == "s3://inputs/e2e/path style.png"
    assert np.array_equal(
        read_png(s3, "sdqueue", result.images[0].key), read_png(s3, "sdqueue", by_s3.images[0].key)
    )


def test_model_loaded_once_for_many_jobs_of_both_modes(queue: SdQueue, s3, worker) -> None:  # type: ignore[no-untyped-def]
    url = upload(s3, "e2e/once.png", smooth_image(7))
    handles = [queue.submit(Txt2ImgJob(prompt=f"t{i}", width=64, height=64, steps=2)) for i in range(4)]
    handles += [
        queue.submit(Img2ImgJob(prompt=f"i{i}", image_url=url, width=64, height=64, steps=4))
        for i in range(4)
    ]
    manifests = [manifest_of(s3, h.wait(timeout=120)) for h in handles]
    assert {m["worker"]["pid"] for m in manifests} == {worker.pid}
    assert {m["worker"]["model_load_count"] for m in manifests} == {1}
    assert int(queue.redis.get(f"sdq:model_loads:{worker.hostname}")) == 1
