"""The GPU benchmark's bookkeeping: parts merge into one report, ratios derive, deviation is right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.diy import deviation
from benchmarks.report import merge_into

SD15_PART = {
    "device": "NVIDIA H200",
    "date": "2026-12-01",
    "diffusers_compiled_images_per_s": 4.0,
    "worker_images_per_s": 5.0,
    "single_job_latency_s": 0.33,
    "bare_pipeline_latency_s": 0.30,
}
SDXL_PART = {
    "device": "NVIDIA H200",
    "date": "2026-12-01",
    "sdxl_diffusers_compiled_images_per_s": 1.0,
    "sdxl_worker_images_per_s": 0.9,
}


def test_parts_merge_into_one_json_table_and_plot(tmp_path: Path) -> None:
    merge_into(SD15_PART, tmp_path)
    path = merge_into(SDXL_PART, tmp_path)
    merged = json.loads(path.read_text())
    assert path.name == "nvidia-h200-2026-12-01.json"
    assert merged["worker_vs_diy"] == pytest.approx(1.25)
    assert merged["sdxl_worker_vs_diy"] == pytest.approx(0.9)
    assert merged["single_job_latency_ratio"] == pytest.approx(1.1)
    table = path.with_suffix(".md").read_text()
    assert "| sdqueue end to end, saturated queue | 5.000 | 1.25x |" in table
    assert "| sdqueue end to end, saturated queue | 0.900 | 0.90x |" in table
    assert path.with_suffix(".png").stat().st_size > 1000


def test_deviation_reports_psnr_and_mean_absolute_difference() -> None:
    reference = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    assert deviation(reference, reference)["psnr_db"] == float("inf")
    off = reference + 5
    measured = deviation(off, reference)
    assert measured["mean_abs_diff"] == pytest.approx(5.0)
    assert measured["psnr_db"] == pytest.approx(10 * torch.log10(torch.tensor(255.0**2 / 25)).item())
