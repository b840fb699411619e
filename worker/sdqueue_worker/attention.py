"""Pick the fastest scaled-dot-product-attention backend for this UNet on this GPU.

PyTorch picks flash attention first on Hopper; cuDNN's fused attention can be faster for the
head sizes SD uses (40/80/160 for SD 1.5, 64 for SDXL). The probe times each backend on the
UNet's own self- and cross-attention shapes at the largest batch bucket, checks its output
against flash, and moves the winner to the front of PyTorch's priority order (the others stay
enabled as fallbacks for shapes the winner cannot run, e.g. the VAE's single 512-wide head).
Set before compiling: inductor fixes the backend when it traces the graph.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
TEXT_TOKENS = 77
Shape = tuple[int, int, int, int, int]
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def attention_shapes(unet_config: Any, batch: int, latent: tuple[int, int]) -> list[Shape]:
    """(batch, heads, query length, key length, head dim) of each attention level of the UNet."""
    channels = list(unet_config.block_out_channels)
    heads = unet_config.num_attention_heads or unet_config.attention_head_dim
    heads = list(heads) if isinstance(heads, list | tuple) else [heads] * len(channels)
    shapes: list[Shape] = []
    for level, kind in enumerate(unet_config.down_block_types):
        if "CrossAttn" not in kind:
            continue
        tokens = (latent[0] >> level) * (latent[1] >> level)
        head_dim = channels[level] // heads[level]
        shapes.append((batch, heads[level], tokens, tokens, head_dim))
        shapes.append((batch, heads[level], tokens, TEXT_TOKENS, head_dim))
    return shapes


def _seconds(backend: SDPBackend, qkv: QKV, reps: int) -> float | None:
    """Seconds per call of one shape, or None where the backend cannot run it or disagrees."""
    q, k, v = qkv
    try:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(reps):
                F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - began) / reps
    except RuntimeError as exc:  # no kernel of this backend for this shape
        log.info(
            "attention backend %s cannot run %s: %s", backend.name, tuple(q.shape), str(exc).splitlines()[0]
        )
        return None
    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float())
    if not torch.allclose(out[:1].float(), reference, atol=2e-2, rtol=2e-2):
        log.warning("attention backend %s disagrees with the reference at %s", backend.name, tuple(q.shape))
        return None
    return seconds


def probe(shapes: list[Shape], dtype: torch.dtype, reps: int = 5) -> dict[str, float]:
    """Seconds per pass over ``shapes`` for each backend; where a backend cannot run a shape, the
    next one in PyTorch's order would, so flash's time counts for it."""
    generator = torch.Generator("cuda").manual_seed(0)
    tensors: list[QKV] = []
    for batch, heads, q_len, kv_len, dim in shapes:
        q = torch.randn(batch, heads, q_len, dim, device="cuda", dtype=dtype, generator=generator)
        k = torch.randn(batch, heads, kv_len, dim, device="cuda", dtype=dtype, generator=generator)
        tensors.append((q, k, torch.randn_like(k)))
    per_shape = {name: [_seconds(b, qkv, reps) for qkv in tensors] for name, b in BACKENDS.items()}
    flash = [t for t in per_shape.pop("flash") if t is not None]
    if len(flash) < len(tensors):
        return {}  # flash cannot run every shape: leave PyTorch's own choice alone
    timings = {"flash": sum(flash)}
    for name, times in per_shape.items():
        if any(t is not None for t in times):
            timings[name] = sum(own if own is not None else f for own, f in zip(times, flash, strict=True))
    return timings


DEFAULT_ORDER = torch._C._get_sdp_priority_order()


def reset() -> None:
    """Back to PyTorch's own priority order."""
    torch._C._set_sdp_priority_order(DEFAULT_ORDER)


def prefer(name: str) -> None:
    """Put ``name`` first in PyTorch's SDPA priority order, keeping the rest as fallbacks."""
    first = BACKENDS[name].value
    order = [first] + [b for b in torch._C._get_sdp_priority_order() if b != first]
    torch._C._set_sdp_priority_order(order)


def choose(setting: str, unet_config: Any, batch: int, latent: tuple[int, int], dtype: torch.dtype) -> str:
    """Apply the attention setting (``auto`` probes); returns the backend put first."""
    if setting == "default":
        return "default"
    if setting != "auto":
        prefer(setting)
        return setting
    timings = probe(attention_shapes(unet_config, batch, latent), dtype)
    if not timings:
        return "default"
    best = min(timings, key=timings.__getitem__)
    log.info(
        "attention probe (ms per UNet pass): %s -> %s",
        {k: round(v * 1e3, 2) for k, v in timings.items()},
        best,
    )
    prefer(best)
    return best
