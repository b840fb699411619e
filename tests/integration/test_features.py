"""Generation features in the worker's own code path, on the tiny model on CPU: named schedulers,
long prompts (chunked, never cut), inpainting, and output formats through the real worker."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdqueue import InpaintJob, JobFailed, JobValidationError, SdQueue, Txt2ImgJob, parse_job
from sdqueue.contract import SCHEDULERS
from sdqueue.errors import InputImageError
from sdqueue_worker.formats import encoding_for
from sdqueue_worker.generation import GenerationRequest, run_batch
from sdqueue_worker.masks import decode_mask
from sdqueue_worker.prompts import CHUNK_TOKENS, PromptCounter
from sdqueue_worker.runtime import load_runtime
from sdqueue_worker.settings import WorkerSettings
from tests.helpers import manifest_of, png_bytes, smooth_image

TOLERANCE = 2  # of 255: batched matmuls may round differently


@pytest.fixture(scope="module")
def runtime(tiny_model: str):  # type: ignore[no-untyped-def]
    return load_runtime(WorkerSettings(model=tiny_model, device="cpu"))


def generate(runtime, jobs_and_seeds, **fields: Any) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    counter = PromptCounter(runtime.txt2img)
    requests = []
    for job, seeds in jobs_and_seeds:
        chunks = counter.measure(job.prompt, job.negative_prompt).chunks
        requests.append(
            GenerationRequest(
                job=job,
                job_id="t",
                seeds=seeds,
                deadline=time.monotonic() + 120,
                prompt_chunks=chunks,
                **fields,
            )
        )
    return run_batch(runtime, requests, lambda step: None)


def differ(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize(
    "scheduler", [s for s in SCHEDULERS if s not in ("default", "euler", "euler_a", "dpmpp_2m")]
)
def test_named_scheduler_runs_and_batches_like_alone(runtime, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    job = Txt2ImgJob(prompt="a lighthouse", width=64, height=64, steps=4, scheduler=scheduler)
    together = generate(runtime, [(job, [1]), (job, [2])])
    alone = generate(runtime, [(job, [2])])[0]
    assert differ(together[1], alone) <= TOLERANCE, "a batched image equals the same job run alone"
    assert np.abs(together[0].astype(int) - together[1].astype(int)).mean() > 2, "different seeds differ"


def test_a_long_prompt_is_chunked_not_cut(runtime) -> None:  # type: ignore[no-untyped-def]
    head = "a lighthouse on a cliff at dusk, " * 7  # ~190 byte-level tokens in the tiny tokenizer
    counter = PromptCounter(runtime.txt2img)
    base = Txt2ImgJob(prompt=head + "the sea is calm", width=64, height=64, steps=4)
    other = base.model_copy(update={"prompt": head + "a violent storm with purple lightning"})
    length = counter.measure(base.prompt, "")
    assert length.tokens > 2 * CHUNK_TOKENS and length.chunks == 3
    images = {job.prompt: generate(runtime, [(job, [3])])[0] for job in (base, other)}
    tail_effect = np.abs(images[base.prompt].astype(int) - images[other.prompt].astype(int)).mean()
    print(f"~{length.tokens}-token prompts differing only after token 75: mean |diff| {tail_effect:.2f}/255")
    assert tail_effect > 1.0, "the words past CLIP's 77-token window must change the image"
    assert differ(generate(runtime, [(base, [3])])[0], images[base.prompt]) == 0
    together = generate(runtime, [(base, [3]), (other, [3])])
    assert differ(together[0], images[base.prompt]) <= TOLERANCE
    assert differ(together[1], images[other.prompt]) <= TOLERANCE


def test_a_long_negative_prompt_is_chunked_too(runtime) -> None:  # type: ignore[no-untyped-def]
    negative = "blurry, low quality, " * 8
    job = Txt2ImgJob(prompt="a fox", negative_prompt=negative + "green", width=64, height=64, steps=4)
    other = job.model_copy(update={"negative_prompt": negative + "violet tones everywhere"})
    assert PromptCounter(runtime.txt2img).measure(job.prompt, job.negative_prompt).chunks == 2
    a, b = generate(runtime, [(job, [4])])[0], generate(runtime, [(other, [4])])[0]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5


def left_half_mask(size: int = 64) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2 :] = 255
    return Image.fromarray(mask, "L")


def test_inpainting_keeps_the_unmasked_part_and_repaints_the_masked_part(runtime) -> None:  # type: ignore[no-untyped-def]
    source = smooth_image(31)
    job = InpaintJob(
        prompt="x", image_url="s3://inputs/i.png", mask_url="s3://inputs/m.png", width=64, height=64, steps=8
    )
    out = generate(runtime, [(job, [9])], init_image=source, mask_image=left_half_mask())[0][0] / 255.0
    pixels = np.asarray(source, dtype=np.float64) / 255.0
    kept = np.abs(out[:, :28] - pixels[:, :28]).mean()
    repainted = np.abs(out[:, 36:] - pixels[:, 36:]).mean()
    print(f"inpaint: |out-in| kept half {kept:.3f}, repainted half {repainted:.3f}")
    assert kept < 0.25 and kept < 0.8 * repainted  # measured: 0.176 kept, 0.275 repainted
    assert type(runtime.inpaint).__name__ == "StableDiffusionInpaintPipeline"
    assert runtime.inpaint.unet is runtime.txt2img.unet and runtime.inpaint.vae is runtime.txt2img.vae


def encoded(image: Image.Image, mode: str | None = None, fmt: str = "PNG") -> bytes:
    return png_bytes(image.convert(mode) if mode else image, fmt)


@pytest.mark.parametrize(
    ("name", "mask", "message"),
    [
        ("other size", left_half_mask(48), "the mask is 48x48 but the image is 64x64"),
        ("colour", smooth_image(1), "the mask has colours"),
        ("alpha", left_half_mask().convert("RGBA"), "mask mode RGBA is not accepted"),
        ("not an image", None, "mask_url: not a PNG, JPEG or WebP file"),
    ],
)
def test_bad_masks_are_clear_errors(name: str, mask: Image.Image | None, message: str) -> None:
    data = b"GIF89a not really" if mask is None else png_bytes(mask)
    with pytest.raises(InputImageError, match=message):
        decode_mask(data, 10**6, (64, 64))


def test_gray_masks_are_accepted_in_their_usual_modes() -> None:
    for mode in ("L", "1", "RGB"):
        mask = decode_mask(encoded(left_half_mask(), mode), 10**6, (64, 64))
        assert mask.mode == "L" and mask.getpixel((0, 0)) == 0 and mask.getpixel((63, 0)) == 255


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "png", "output_quality": 80}, "png and lossless webp have no quality"),
        ({"output_format": "jpeg", "output_lossless": True}, "only webp has a lossless mode"),
        ({"output_format": "webp", "output_quality": 101}, "output_quality"),
        ({"loras": [{"name": "a"}, {"name": "a"}]}, "each adapter may appear once"),
        ({"scheduler": "dpmpp_3m"}, "scheduler"),
        ({"scheduler": "pndm", "steps": 3}, "pndm needs at least 4 steps"),
    ],
)
def test_bad_feature_fields_are_refused_by_the_contract(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(JobValidationError, match=message):
        parse_job({"mode": "txt2img", "prompt": "p", **fields})


def test_inpaint_contract_needs_a_mask() -> None:
    with pytest.raises(JobValidationError, match="mask_url: Field required"):
        parse_job({"mode": "inpaint", "prompt": "p", "image_url": "s3://inputs/a.png"})


@pytest.mark.parametrize(
    ("fields", "pil_format", "lossless"),
    [
        ({}, "PNG", True),
        ({"output_format": "webp", "output_lossless": True}, "WEBP", True),
        ({"output_format": "webp"}, "WEBP", False),
        ({"output_format": "jpeg", "output_quality": 70}, "JPEG", False),
    ],
)
def test_each_output_format_round_trips(fields: dict[str, Any], pil_format: str, lossless: bool) -> None:
    pixels = np.asarray(smooth_image(5), dtype=np.uint8)
    encoding = encoding_for(Txt2ImgJob(prompt="p", **fields), 1)
    decoded = Image.open(io.BytesIO(encoding.encode(pixels)))
    assert decoded.format == pil_format
    error = np.abs(np.asarray(decoded.convert("RGB"), dtype=int) - pixels).mean()
    assert error == 0 if lossless else 0 < error < 8


@pytest.mark.usefixtures("worker")
def test_webp_and_jpeg_outputs_through_the_worker(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    common = dict(prompt="a red fox", width=64, height=64, steps=2, seed=3)
    cases = {"webp": ("image/webp", "webp", "WEBP"), "jpeg": ("image/jpeg", "jpg", "JPEG")}
    handles = {fmt: queue.submit(Txt2ImgJob(output_format=fmt, **common)) for fmt in cases}
    for fmt, (content_type, extension, pil_format) in cases.items():
        result = handles[fmt].wait(timeout=180)
        image = result.images[0]
        assert image.key == f"outputs/{result.job_id}/0.{extension}"
        stored = s3.get_object(Bucket=image.bucket, Key=image.key)
        assert stored["ContentType"] == content_type
        assert Image.open(io.BytesIO(stored["Body"].read())).format == pil_format
        manifest = manifest_of(s3, result)
        assert manifest["output_encoding"] == {
            "format": fmt,
            "quality": 90,
            "lossless": False,
            "content_type": content_type,
        }
        assert manifest["images"][0]["content_type"] == content_type


@pytest.mark.usefixtures("worker")
def test_inpaint_through_the_worker(queue: SdQueue, s3) -> None:  # type: ignore[no-untyped-def]
    s3.put_object(Bucket="inputs", Key="features/in.png", Body=png_bytes(smooth_image(8)))
    s3.put_object(Bucket="inputs", Key="features/mask.png", Body=png_bytes(left_half_mask()))
    s3.put_object(Bucket="inputs", Key="features/small.png", Body=png_bytes(left_half_mask(32)))
    common = dict(prompt="p", image_url="s3://inputs/features/in.png", width=64, height=64, steps=4, seed=1)
    good = queue.submit(InpaintJob(mask_url="s3://inputs/features/mask.png", **common))
    bad = queue.submit(InpaintJob(mask_url="s3://inputs/features/small.png", **common))
    manifest = manifest_of(s3, good.wait(timeout=180))
    assert manifest["mode"] == "inpaint"
    assert manifest["model"]["pipeline"] == "StableDiffusionInpaintPipeline"
    assert manifest["input"]["mask"]["url"] == "s3://inputs/features/mask.png"
    with pytest.raises(JobFailed) as info:
        bad.wait(timeout=180)
    assert info.value.error_type == "InputImageError" and "the mask is 32x32" in str(info.value)


def tiny_sdxl_text_side(tmp_path: Path) -> Any:
    """SDXL's text side in miniature: two tokenizers, CLIPTextModel and CLIPTextModelWithProjection."""
    from types import SimpleNamespace

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdqueue_worker.tiny_model import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(tmp_path)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = dict(
        vocab_size=len(tokenizer),
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=eos - 1,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return SimpleNamespace(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, projection_dim=32, **config)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=48, projection_dim=24, **config)
        ).eval(),
    )


def test_sdxl_long_prompts_use_both_encoders_and_the_first_chunks_pooled_output(tmp_path: Path) -> None:
    from sdqueue_worker.prompts import batch_embeddings

    pipe = tiny_sdxl_text_side(tmp_path)
    head = "a lighthouse on a cliff at dusk, " * 4
    with torch.inference_mode():
        calm = batch_embeddings(pipe, [(head + "calm sea", "")], chunks=2)
        storm = batch_embeddings(pipe, [(head + "violent storm", "")], chunks=2)
    assert calm["prompt_embeds"].shape == (1, 2 * 77, 32 + 48)
    assert calm["negative_prompt_embeds"].shape == (1, 2 * 77, 32 + 48)
    assert calm["pooled_prompt_embeds"].shape == calm["negative_pooled_prompt_embeds"].shape == (1, 24)
    assert torch.equal(calm["pooled_prompt_embeds"], storm["pooled_prompt_embeds"]), (
        "pooled: first chunk only"
    )
    assert torch.equal(calm["prompt_embeds"][:, :77], storm["prompt_embeds"][:, :77])
    assert not torch.allclose(calm["prompt_embeds"][:, 77:], storm["prompt_embeds"][:, 77:]), (
        "the tail counts"
    )
