"""Merge benchmark parts into one JSON per device and date, with a markdown table and a PNG plot.

    python -m benchmarks.report benchmarks/results/raw/*.json   # merge raw parts, rewrite the report

The headline is the ratio to the do-it-yourself baseline (benchmarks/diy.py) measured in the
same run: below 1.0 the hand-written diffusers loop is faster than sdqueue end to end.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

FAMILIES = {
    "SD 1.5, 512x512, 50 steps, batch 8": "",
    "SDXL, 1024x1024, 30 steps, batch 4": "sdxl_",
}
ROWS = [
    ("seed recipe (fp32, PNDM, one job at a time)", "seed_recipe_images_per_s"),
    ("plain diffusers fp16 eager, batch 1", "diffusers_fp16_bs1_images_per_s"),
    ("plain diffusers fp16 eager, same batch", "diffusers_eager_images_per_s"),
    ("do-it-yourself: compiled UNet, same batch (baseline)", "diffusers_compiled_images_per_s"),
    ("sdqueue end to end, saturated queue", "worker_images_per_s"),
    ("sdqueue end to end, opt-in FP8 UNet", "fp8_worker_images_per_s"),
]
MEASURES = [
    "worker_vs_diy",
    "fp8_worker_vs_diy",
    "fp8_psnr_db",
    "fp8_mean_abs_diff",
    "single_job_latency_s",
    "bare_pipeline_latency_s",
    "run_batch_latency_s",
    "executor_latency_s",
    "single_job_latency_ratio",
    "cold_start_s",
    "cold_start_warm_cache_s",
    "gpu_busy_fraction",
    "mfu",
    "vram_ratio_t2i_i2i",
    "attention_backend",
    "vae_decode_fp32_s",
    "vae_decode_bf16_s",
]
REPORTED = {key for _, key in ROWS} | set(MEASURES)
"""Keys (after a family's prefix) the table shows; a family with none of them is left out."""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def derive(results: dict[str, Any]) -> None:
    """Ratios that need keys from more than one part (recomputed on every merge)."""
    for prefix in FAMILIES.values():
        baseline = results.get(prefix + "diffusers_compiled_images_per_s")
        if baseline and results.get(prefix + "worker_images_per_s"):
            results[prefix + "worker_vs_diy"] = results[prefix + "worker_images_per_s"] / baseline
        fp8_baseline = results.get(prefix + "fp8_baseline_images_per_s")
        if fp8_baseline and results.get(prefix + "fp8_worker_images_per_s"):
            results[prefix + "fp8_worker_vs_diy"] = results[prefix + "fp8_worker_images_per_s"] / fp8_baseline
    if results.get("single_job_latency_s") and results.get("bare_pipeline_latency_s"):
        results["single_job_latency_ratio"] = (
            results["single_job_latency_s"] / results["bare_pipeline_latency_s"]
        )
    if results.get("seed_recipe_images_per_s") and results.get("worker_images_per_s"):
        results["speedup_vs_seed_recipe"] = (
            results["worker_images_per_s"] / results["seed_recipe_images_per_s"]
        )


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "not measured" if value is None else str(value)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Device: {results['device']} | torch {results.get('torch')} | {results['date']}", ""]
    for title, prefix in FAMILIES.items():
        if not any(key.startswith(prefix) and key[len(prefix) :] in REPORTED for key in results):
            continue  # a day whose runs did not include this family
        baseline = results.get(prefix + "diffusers_compiled_images_per_s")
        lines += [f"### {title}", "", "| system | images/s | vs do-it-yourself |", "| --- | ---: | ---: |"]
        for name, key in ROWS:
            value = results.get(prefix + key)
            if value is None:
                continue
            ratio = f"{value / baseline:.2f}x" if baseline else "-"
            lines.append(f"| {name} | {value:.3f} | {ratio} |")
        lines += ["", "| measure | value |", "| --- | ---: |"]
        lines += [
            f"| {prefix + key} | {cell(results[prefix + key])} |"
            for key in MEASURES
            if prefix + key in results
        ]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, p) for t, p in FAMILIES.items() if results.get(p + "diffusers_compiled_images_per_s")]
    if not panels:
        return
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for axis, (title, prefix) in zip(axes[:, 0], panels, strict=True):
        baseline = results[prefix + "diffusers_compiled_images_per_s"]
        rows = [(name, results[prefix + key]) for name, key in ROWS if results.get(prefix + key)]
        names, values = [n for n, _ in rows], [v / baseline for _, v in rows]
        colours = ["#d8793a" if n.startswith("sdqueue") else "#6a9fd8" for n in names]
        bars = axis.barh(names, values, color=colours)
        axis.bar_label(
            bars, labels=[f"{v:.2f}x ({r:.2f}/s)" for v, (_, r) in zip(values, rows, strict=True)], padding=3
        )
        axis.axvline(1.0, color="#444444", linewidth=0.8, linestyle="--")
        axis.set_title(f"{title} on {results['device']}", fontsize=9)
        axis.set_xlim(0, max(values) * 1.35)
        axis.invert_yaxis()
    axes[-1, 0].set_xlabel("images/s relative to the do-it-yourself loop, same run")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def merge_into(results: dict[str, Any], out: Path) -> Path:
    """Merge one part's results into ``<out>/<device>-<date>.json`` and rewrite its table and plot."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{slug(str(results['device']))[:40]}-{results['date']}"
    merged: dict[str, Any] = {}
    if stem.with_suffix(".json").exists():
        merged = json.loads(stem.with_suffix(".json").read_text())
    merged.update(results)
    derive(merged)
    stem.with_suffix(".json").write_text(json.dumps(merged, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(merged))
    plot(merged, stem.with_suffix(".png"))
    return stem.with_suffix(".json")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("parts", nargs="+", type=Path, help="raw part JSON files, merged in this order")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    for part in args.parts:
        print(merge_into(json.loads(part.read_text()), args.out))


if __name__ == "__main__":
    main()
