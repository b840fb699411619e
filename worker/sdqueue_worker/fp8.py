"""Opt-in FP8 UNet (``SDQ_FP8=1``): the UNet's linear layers and 1x1 convolutions run on FP8 tensor
cores.

Each eligible layer is replaced by a :class:`Float8Linear`: its weight is stored in float8 e4m3
with one scale per output row; activations are scaled per row on the fly and the product runs
through ``torch._scaled_mm`` (row-wise scales), in plain tensor operations that ``torch.compile``
fuses into the surrounding graph. 3x3 convolutions, attention itself, norms and the VAE stay
16-bit. Outputs are not identical to 16-bit ones: the benchmark reports PSNR and mean absolute
pixel difference against the 16-bit pipeline on fixed seeds. Needs bfloat16 weights and a GPU with
FP8 tensor cores (compute capability 8.9+); it cannot be combined with LoRA adapters, which wrap
the 16-bit layers this replaces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdqueue.errors import StartupError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
_ALIGN = 16  # torch._scaled_mm needs every matrix dimension divisible by 16
# per-sample embeddings: a handful of rows each, where FP8 saves nothing and costs precision
_KEEP_16_BIT = ("time_embedding", "add_embedding", "time_emb_proj")


def check_fp8_supported(device: torch.device, dtype: torch.dtype, loras: bool = False) -> None:
    """Fail start-up with a clear message where FP8 cannot run."""
    if loras:
        raise StartupError(
            "SDQ_FP8=1 cannot be combined with SDQ_LORA_DIR: LoRA adapters wrap the 16-bit "
            "layers that FP8 replaces; unset one of them"
        )
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise StartupError("SDQ_FP8=1 needs a CUDA GPU with FP8 tensor cores (Ada/Hopper or newer)")
    if dtype != torch.bfloat16:
        raise StartupError("SDQ_FP8=1 needs SDQ_DTYPE=bfloat16 (or auto on a bf16-capable GPU)")


def _rowwise(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix`` (rows x k) as float8 and its float32 per-row scales (rows x 1)."""
    scale = matrix.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (matrix.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Float8Linear(torch.nn.Module):
    """``x @ W.T + b`` with ``W`` in float8 (per-row scales) and ``x`` scaled per row on the fly.

    Built from an ``nn.Linear`` or a 1x1 ``nn.Conv2d`` (then applied over the channel dimension
    of NCHW inputs; with channels_last inputs the reshapes are views).
    """

    def __init__(self, layer: torch.nn.Linear | torch.nn.Conv2d) -> None:
        super().__init__()
        weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        quantised, scale = _rowwise(weight)
        self.weight: torch.Tensor
        self.weight_scale: torch.Tensor
        self.register_buffer("weight", quantised)
        self.register_buffer("weight_scale", scale.t().contiguous())  # 1 x out
        self.bias = layer.bias
        self.conv = isinstance(layer, torch.nn.Conv2d)
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            batch, _, height, width = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(batch * height * width, -1)
            out = self._matmul(rows)
            return out.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        lead = x.shape[:-1]
        return self._matmul(x.reshape(-1, x.shape[-1])).reshape(*lead, self.out_features)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        count = rows.shape[0]
        pad = -count % _ALIGN
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))
        quantised, scale = _rowwise(rows)
        out = torch._scaled_mm(
            quantised, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=rows.dtype
        )
        if pad:
            out = out[:count]
        return out if self.bias is None else out + self.bias


def eligible(module: torch.nn.Module, name: str) -> bool:
    """Linear layers and 1x1 convolutions whose dimensions FP8 matrix products accept."""
    if any(part in name for part in _KEEP_16_BIT):
        return False
    if isinstance(module, torch.nn.Linear):
        return module.in_features % _ALIGN == 0 and module.out_features % _ALIGN == 0
    if isinstance(module, torch.nn.Conv2d):
        return (
            module.kernel_size == (1, 1)
            and module.stride == (1, 1)
            and module.groups == 1
            and module.padding in ((0, 0), "valid")
            and module.in_channels % _ALIGN == 0
            and module.out_channels % _ALIGN == 0
        )
    return False


def quantize_unet_fp8(unet: torch.nn.Module) -> int:
    """Replace the UNet's eligible layers by :class:`Float8Linear` in place; returns how many."""
    targets = [(name, module) for name, module in unet.named_modules() if eligible(module, name)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, Float8Linear(module))
    return len(targets)
