"""Which engine levers beat the do-it-yourself loop: each one timed on the same plain diffusers loop,
in one process on one GPU, against the do-it-yourself configuration itself.

    python -m benchmarks.levers --out DIR [--family sd15|sdxl] [--budget-s 480]

Every lever starts from the do-it-yourself recipe (benchmarks/diy.py: bf16, channels_last, fused
QKV, 1x1 convolutions as matmuls, ``torch.compile(mode="reduce-overhead")`` on the UNet) and adds
one change; each is compiled afresh (``torch._dynamo.reset()``), warmed once and timed over three
full pipeline calls at the worker's batch. The do-it-yourself loop itself always runs first (also
when ``--levers`` leaves it out), so each ratio is to the baseline of the same run. Levers run
in order until the time budget is spent; the JSON is rewritten after each, so a run cut short
still reports what it measured. Every other lever also reports PSNR and mean absolute pixel
difference against the loop's images on the same seeds.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import diy

Lever = Callable[[Any], None]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _inductor() -> Any:
    import torch._inductor.config as inductor

    return inductor


def baseline(pipe: Any) -> None:
    diy.optimise(pipe, compiled=True)


def cudnn_benchmark(pipe: Any) -> None:
    torch.backends.cudnn.benchmark = True
    diy.optimise(pipe, compiled=True)


def coordinate_descent(pipe: Any) -> None:
    inductor = _inductor()
    inductor.coordinate_descent_tuning = True
    inductor.coordinate_descent_check_all_directions = True
    diy.optimise(pipe, compiled=True)


def compiled_vae(pipe: Any) -> None:
    diy.optimise(pipe, compiled=True)
    pipe.vae.decoder.forward = torch.compile(pipe.vae.decoder.forward)


def eager(pipe: Any) -> None:
    diy.optimise(pipe, compiled=False)


def fp8_eager(pipe: Any) -> None:
    from sdqueue_worker.fp8 import quantize_unet_fp8

    diy.optimise(pipe, compiled=False)
    quantize_unet_fp8(pipe.unet)


def fp8_compiled(mode: str | None) -> Lever:
    def lever(pipe: Any) -> None:
        fp8_eager(pipe)
        diy.compile_unet(pipe, mode)

    return lever


def max_autotune(pipe: Any) -> None:
    diy.optimise(pipe, compiled=False)
    diy.compile_unet(pipe, "max-autotune")


LEVERS: dict[str, Lever] = {
    "diy": baseline,
    "cudnn_benchmark": cudnn_benchmark,
    "compiled_vae": compiled_vae,
    "eager": eager,
    "fp8_eager": fp8_eager,
    "fp8_no_cudagraphs": fp8_compiled(None),
    "fp8_linear": fp8_compiled("reduce-overhead"),
    "coordinate_descent": coordinate_descent,
    "max_autotune": max_autotune,
}


def reset() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    torch.backends.cudnn.benchmark = False
    inductor = _inductor()
    inductor.coordinate_descent_tuning = False
    inductor.coordinate_descent_check_all_directions = False
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(
    model: str, lever: Lever, batch: int, steps: int, size: int
) -> tuple[dict[str, float], torch.Tensor]:
    pipe = diy.load(model, torch.bfloat16, "cuda")
    lever(pipe)
    seeds = list(range(batch))
    began = time.perf_counter()
    diy.call(pipe, seeds, steps, size)
    diy.sync()
    first = time.perf_counter() - began
    seconds = diy.median_time(lambda: diy.call(pipe, seeds, steps, size), reps=3, warm=1)
    images = diy.to_uint8(diy.call(pipe, seeds, steps, size))
    return {"images_per_s": batch / seconds, "first_call_s": first}, images


def build(family: str, work: Path) -> tuple[str, int, int, int]:
    if family == "sd15":
        from benchmarks.sd15 import build_sd15

        return str(build_sd15(work / "sd15")), 8, 50, 512
    from benchmarks.sdxl import build_sdxl

    return str(build_sdxl(work / "sdxl", device="cuda", tiny=False)), 4, 30, 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/raw")
    parser.add_argument("--workdir", default="/tmp/sdq-levers")
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--budget-s", type=float, default=480.0)
    args = parser.parse_args()
    faulthandler.dump_traceback_later(90, repeat=True)  # where a long compile spends its time
    started = time.perf_counter()
    model, batch, steps, size = build(args.family, Path(args.workdir))
    out = Path(args.out) / f"levers-{args.family}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "family": args.family,
        "batch": batch,
        "steps": steps,
        "size": size,
        "levers": {},
    }
    reference: torch.Tensor | None = None
    # the baseline runs first in every run: a lever's ratio is to the loop measured beside it
    for name in ["diy"] + [lever for lever in args.levers.split(",") if lever != "diy"]:
        if time.perf_counter() - started > args.budget_s:
            log(f"budget spent: {name} not run")
            results["levers"][name] = "not run (time budget)"
            continue
        reset()
        log(f"{name} ...")
        try:
            measured, images = measure(model, LEVERS[name], batch, steps, size)
        except Exception as exc:  # a lever that fails is a result too
            log(f"{name} failed: {exc!r}")
            results["levers"][name] = f"failed: {exc!r}"[:500]
            continue
        if reference is None:
            reference = images
        else:
            measured.update(diy.deviation(images, reference))
        base = results["levers"].get("diy")
        if isinstance(base, dict):
            measured["vs_diy"] = measured["images_per_s"] / base["images_per_s"]
        results["levers"][name] = measured
        log(f"{name}: {measured}")
        out.write_text(json.dumps(results, indent=1))
    log(f"done in {time.perf_counter() - started:.0f}s -> {out}")


if __name__ == "__main__":
    main()
