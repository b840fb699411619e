"""Write a benchmark's JSON, a markdown table and a PNG plot next to each other."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROWS = [
    ("seed recipe (fp32, one job at a time)", "seed_recipe_images_per_s"),
    ("plain diffusers fp16, batch 1", "diffusers_fp16_bs1_images_per_s"),
    ("sdqueue end to end, saturated queue", "worker_images_per_s"),
]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Device: {results['device']} | {results['size']}x{results['size']}, {results['steps']} steps, "
        f"guidance {results['guidance_scale']} | torch {results['torch']} | {results['date']}",
        "",
        "| system | images/s | vs seed recipe |",
        "| --- | ---: | ---: |",
    ]
    base = results["seed_recipe_images_per_s"]
    lines += [f"| {name} | {results[key]:.3f} | {results[key] / base:.2f}x |" for name, key in ROWS]
    lines += ["", "| measure | value |", "| --- | ---: |"]
    for key in (
        "single_job_latency_s",
        "bare_pipeline_latency_s",
        "single_job_latency_ratio",
        "gpu_busy_fraction",
        "mfu",
        "cold_start_s",
        "cold_start_warm_cache_s",
        "vram_ratio_t2i_i2i",
        "speedup_vs_diffusers_fp16_bs1",
    ):
        value = results.get(key)
        lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in ROWS]
    values = [results[key] for _, key in ROWS]
    figure, axis = plt.subplots(figsize=(7, 3))
    bars = axis.barh(names, values, color=["#999999", "#6a9fd8", "#d8793a"])
    axis.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3)
    axis.set_xlabel(f"images/s ({results['size']}px, {results['steps']} steps) on {results['device']}")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{slug(str(results['device']))[:40]}-{results['date']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    plot(results, stem.with_suffix(".png"))
    return stem.with_suffix(".json")
