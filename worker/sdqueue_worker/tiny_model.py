"""Build the tiny random Stable Diffusion pipeline that tests and the demo use.

Same architecture family and code path as SD 1.x (UNet2DConditionModel, AutoencoderKL, CLIP
text encoder, CLIP tokenizer, a scheduler), saved with ``save_pretrained`` and loaded back
through the real ``from_pretrained`` path. Deterministic: built from fixed seeds.

The UNet and text encoder are random. The VAE is briefly trained to reconstruct smooth images,
so that img2img at low strength stays close to its input: that is what lets a test prove img2img
really uses the input image.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BUILDER_VERSION = "3"
MARKER = "sdqueue-tiny-model.json"


def build_tokenizer(workdir: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges, built without any download."""
    byte_values = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in byte_values] + [chr(256 + n) for n in range(256 - len(byte_values))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(workdir / "vocab.json"), str(workdir / "merges.txt"), model_max_length=77)


def build_text_encoder(vocab_size: int, eos_id: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=eos_id - 1,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def smooth_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random smooth colour fields in [-1, 1]: what the VAE learns to reconstruct."""
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return images.clamp(-1, 1)


def build_vae(train_steps: int = 250) -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32,
        sample_size=64,
    )
    generator = torch.Generator().manual_seed(1)
    optimiser = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(train_steps):
        batch = smooth_images(8, 32, generator)
        latents = vae.encode(batch).latent_dist.mode()
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, batch)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    with torch.no_grad():
        latents = vae.encode(smooth_images(16, 32, generator)).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae.eval()


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """Build the tiny pipeline in memory (deterministic)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionPipeline(
        vae=build_vae(),
        text_encoder=build_text_encoder(len(tokenizer), eos_id),
        tokenizer=tokenizer,
        unet=build_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def is_built(path: Path) -> bool:
    marker = path / MARKER
    return marker.exists() and json.loads(marker.read_text()).get("version") == BUILDER_VERSION


def build_tiny_model(path: str | Path, force: bool = False) -> Path:
    """Save the tiny pipeline to ``path`` (skipped when an up-to-date build is there)."""
    target = Path(path)
    if is_built(target) and not force:
        return target
    torch.set_num_threads(2)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    build_tiny_pipeline().save_pretrained(staging, safe_serialization=True)
    (staging / MARKER).write_text(json.dumps({"version": BUILDER_VERSION}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
