"""The FP8 layers: what they replace, what they keep, and how far their products move from the 16-bit
ones. On an FP8-capable GPU they run there; elsewhere on the CPU (torch._scaled_mm runs on the CPU
from torch 2.13, the version the project's constraints install)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdqueue.errors import StartupError
from sdqueue_worker.fp8 import FP8, Float8Linear, check_fp8_supported, eligible, quantize_unet_fp8

DEVICE = "cuda" if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) else "cpu"


def relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    return float(
        (test.detach().float() - reference.detach().float()).abs().mean() / reference.float().abs().mean()
    )


@pytest.mark.parametrize("rows", [1, 7, 16, 77 * 2])  # row counts that need padding to 16 and not
def test_linear_matches_the_16_bit_product(rows: int) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(DEVICE, torch.bfloat16)
    x = torch.randn(rows, 64, dtype=torch.bfloat16, device=DEVICE)
    fp8 = Float8Linear(linear)
    out = fp8(x)
    assert fp8.weight.dtype == FP8 and out.dtype == torch.bfloat16
    assert out.shape == (rows, 48)
    assert relative_error(out, linear(x)) < 0.06


def test_batched_inputs_keep_their_leading_dimensions() -> None:
    linear = torch.nn.Linear(32, 32, bias=False).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 3, 5, 32, dtype=torch.bfloat16, device=DEVICE)
    out = Float8Linear(linear)(x)
    assert out.shape == (2, 3, 5, 32)
    assert relative_error(out, linear(x)) < 0.06


def test_one_by_one_convolution_over_channels_last_input() -> None:
    conv = torch.nn.Conv2d(32, 64, 1).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 32, 5, 6, dtype=torch.bfloat16, device=DEVICE).to(memory_format=torch.channels_last)
    out = Float8Linear(conv)(x)
    assert out.shape == (2, 64, 5, 6)
    assert relative_error(out, conv(x)) < 0.06


def test_only_matrix_shaped_layers_are_eligible() -> None:
    assert eligible(torch.nn.Linear(32, 64), "down.attn.to_qkv")
    assert eligible(torch.nn.Conv2d(32, 64, 1), "mid.proj_in")
    assert not eligible(torch.nn.Conv2d(32, 64, 3, padding=1), "mid.conv1")
    assert not eligible(torch.nn.Conv2d(32, 64, 1, stride=2), "mid.down")
    assert not eligible(torch.nn.Linear(30, 64), "odd.in_features")
    assert not eligible(torch.nn.Linear(32, 64), "time_embedding.linear_1")
    assert not eligible(torch.nn.Linear(32, 64), "down_blocks.0.resnets.0.time_emb_proj")


def test_the_unet_keeps_its_output_within_a_few_percent(tiny_model: str) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(tiny_model) / "unet").to(DEVICE, torch.bfloat16)
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16, device=DEVICE)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16, device=DEVICE)
    with torch.inference_mode():
        reference = unet(sample, 10, text).sample
        replaced = quantize_unet_fp8(unet)
        out = unet(sample, 10, text).sample
    layers = dict(unet.named_modules())
    assert replaced == sum(isinstance(m, Float8Linear) for m in layers.values()) > 0
    assert not any(isinstance(m, Float8Linear) for n, m in layers.items() if "time_embedding" in n)
    assert 0 < relative_error(out, reference) < 0.15


def test_fp8_refuses_lora_adapters_and_the_cpu() -> None:
    with pytest.raises(StartupError, match="FP8 tensor cores"):
        check_fp8_supported(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(StartupError, match="SDQ_LORA_DIR"):
        check_fp8_supported(torch.device("cuda"), torch.bfloat16, loras=True)
