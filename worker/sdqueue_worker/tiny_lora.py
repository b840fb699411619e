"""Build tiny LoRA adapters for the tiny model (tests and the demo): ``<name>.safetensors``.

Rank-4 adapters on the UNet's attention projections, with random (seeded) A and B matrices so
that they change the image, saved in the diffusers/PEFT LoRA format that ``load_lora_weights``
reads. Deterministic per seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_tiny_lora(model: str | Path, folder: str | Path, name: str, seed: int, rank: int = 4) -> Path:
    """Save a random LoRA for the UNet of ``model`` as ``folder/name.safetensors``."""
    unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for parameter in unet.parameters():
            if parameter.requires_grad:  # only the adapter's weights: the base is frozen
                parameter.mul_(2.0)
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        target, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=f"{name}.safetensors"
    )
    return target / f"{name}.safetensors"
