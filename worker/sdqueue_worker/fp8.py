"""Opt-in FP8 UNet (``SDQ_FP8=1``): torchao float8 dynamic quantisation of the UNet's linear layers.

Weights are stored in float8 e4m3 with one scale per output row; activations are quantised per
row on the fly, and the matrix products run on Hopper's FP8 tensor cores (``torch._scaled_mm``).
Convolutions stay 16-bit. Outputs are not identical to 16-bit ones: the benchmark reports PSNR
and mean absolute pixel difference against the 16-bit pipeline on fixed seeds. Needs bfloat16
weights, a GPU with FP8 tensor cores (compute capability 8.9+) and the ``torchao`` package.
"""

from __future__ import annotations

import torch

from sdqueue.errors import StartupError


def check_fp8_supported(device: torch.device, dtype: torch.dtype) -> None:
    """Fail start-up with a clear message where FP8 cannot run."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise StartupError("SDQ_FP8=1 needs a CUDA GPU with FP8 tensor cores (Ada/Hopper or newer)")
    if dtype != torch.bfloat16:
        raise StartupError("SDQ_FP8=1 needs SDQ_DTYPE=bfloat16 (or auto on a bf16-capable GPU)")


def quantize_unet_fp8(unet: torch.nn.Module) -> int:
    """Quantise the UNet's linear layers to float8 in place; returns how many were quantised."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise StartupError(f"SDQ_FP8=1 needs the torchao package: {exc}") from exc

    def eligible(module: torch.nn.Module, _name: str) -> bool:
        # torch._scaled_mm needs both matrix dimensions divisible by 16
        return (
            isinstance(module, torch.nn.Linear)
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    count = sum(1 for name, module in unet.named_modules() if eligible(module, name))
    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=eligible)
    return count
