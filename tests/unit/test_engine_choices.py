"""The engine's start-up choices that need no GPU: attention shapes, dtype, the FP8 guard."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sdqueue.errors import StartupError
from sdqueue_worker import attention
from sdqueue_worker.fp8 import check_fp8_supported
from sdqueue_worker.runtime import pick_dtype
from sdqueue_worker.settings import WorkerSettings

SD15 = SimpleNamespace(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    num_attention_heads=None,
    attention_head_dim=8,
)
SDXL = SimpleNamespace(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    num_attention_heads=None,
    attention_head_dim=(5, 10, 20),
)


def test_sd15_attention_shapes_are_the_unets_own() -> None:
    shapes = attention.attention_shapes(SD15, 16, (64, 64))
    assert shapes[0] == (16, 8, 4096, 4096, 40)  # self-attention at 64x64 latents, 40-wide heads
    assert shapes[1] == (16, 8, 4096, 77, 40)  # cross-attention to the 77 text tokens
    assert [s[-1] for s in shapes[::2]] == [40, 80, 160]
    assert [s[2] for s in shapes[::2]] == [4096, 1024, 256]


def test_sdxl_attention_shapes_skip_the_level_without_attention() -> None:
    shapes = attention.attention_shapes(SDXL, 8, (128, 128))
    assert shapes[::2] == [(8, 10, 4096, 4096, 64), (8, 20, 1024, 1024, 64)]


def test_an_explicit_backend_goes_first_and_the_rest_stay_as_fallbacks() -> None:
    before = torch._C._get_sdp_priority_order()
    try:
        assert attention.choose("cudnn", SD15, 2, (8, 8), torch.float32) == "cudnn"
        order = torch._C._get_sdp_priority_order()
        assert order[0] == attention.BACKENDS["cudnn"].value and sorted(order) == sorted(before)
        assert attention.choose("default", SD15, 2, (8, 8), torch.float32) == "default"
    finally:
        torch._C._set_sdp_priority_order(before)


def test_dtype_auto_is_float32_on_the_cpu_and_an_explicit_one_wins() -> None:
    assert pick_dtype(WorkerSettings(), torch.device("cpu")) is torch.float32
    assert pick_dtype(WorkerSettings(dtype="bfloat16"), torch.device("cpu")) is torch.bfloat16


def test_fp8_refuses_to_start_where_it_cannot_run() -> None:
    with pytest.raises(StartupError, match="FP8 tensor cores"):
        check_fp8_supported(torch.device("cpu"), torch.bfloat16)
    assert WorkerSettings().fp8 is False
