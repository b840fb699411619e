"""An SDXL-architecture pipeline with random weights, full size (for GPU timings) or tiny (for tests),
saved with ``save_pretrained`` so the worker loads it through the real ``from_pretrained`` path.

Full size is SDXL 1.0 base's architecture: UNet 320/640/1280 with 1/2/10 transformer layers and
64-wide heads, CLIP ViT-L and OpenCLIP bigG text encoders, the SD VAE at 1024 px.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdqueue_worker.tiny_model import build_tokenizer

FULL = {
    "unet": dict(
        sample_size=128,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        addition_time_embed_dim=256,
    ),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024),
    "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "text_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20),
}
TINY = {
    "unet": dict(
        sample_size=32,
        layers_per_block=1,
        block_out_channels=(32, 64),
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4),
        addition_time_embed_dim=8,
        norm_num_groups=32,
    ),
    "vae": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=64, norm_num_groups=32),
    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "text_2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


def _text(size: dict[str, int], vocab: int, with_projection: bool) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab,
        max_position_embeddings=77,
        projection_dim=size["hidden_size"],
        hidden_act="gelu" if with_projection else "quick_gelu",
        **size,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _modules(sizes: dict[str, dict[str, int]], vocab: int) -> dict[str, torch.nn.Module]:
    text, text_2 = _text(sizes["text"], vocab, False), _text(sizes["text_2"], vocab, True)
    unet_size = dict(sizes["unet"])
    levels = len(unet_size["block_out_channels"])
    time_dim = unet_size["addition_time_embed_dim"]
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=sizes["text"]["hidden_size"] + sizes["text_2"]["hidden_size"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        projection_class_embeddings_input_dim=6 * time_dim + sizes["text_2"]["hidden_size"],
        **unet_size,
    )
    vae_size = dict(sizes["vae"])
    levels = len(vae_size["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        scaling_factor=0.13025,
        force_upcast=True,
        **vae_size,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2}


def build_sdxl(path: Path, device: str = "cuda", tiny: bool = False) -> Path:
    """Build (on ``device``) and save in fp16; weights scaled down to keep 16-bit activations finite."""
    if (path / "model_index.json").exists():
        return path
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    with torch.device(device):
        modules = _modules(TINY if tiny else FULL, len(tokenizer))
    with torch.no_grad():
        for module in modules.values():
            for parameter in module.parameters():
                if parameter.dim() > 1:
                    parameter.mul_(0.5)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
        **modules,  # type: ignore[arg-type]
    )
    pipe.to(dtype=torch.float16).save_pretrained(path, safe_serialization=True)
    return path
