"""GPU benchmark: the seed recipe, plain diffusers and sdqueue end to end, in one run on one GPU.

    python -m benchmarks.gpu_bench --out benchmarks/results     # on the GPU machine
    python -m benchmarks.gpu_bench --smoke                      # CPU dry run with the tiny model

Writes ``<out>/<gpu>-<date>.json`` (+ .md table and .png plot). Workload: 512x512, 50 steps,
guidance 7.5; sdqueue jobs use the Euler scheduler (50 UNet calls), the seed recipe keeps its
default PNDM (51 calls) as the original design ran it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import write_report
from benchmarks.sd15 import build_sd15
from devstack.services import MotoServer, RedisServer, WorkerProcess, stack_env
from sdqueue import SdQueue, Txt2ImgJob
from sdqueue.settings import Settings
from sdqueue_worker.settings import WorkerSettings

UNET_TFLOP_PER_IMAGE_50 = 82.9  # design brief: 50-step, guided, 512x512 image incl. VAE decode


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], reps: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds = median_time(lambda: a @ b, 10)
    return 2 * 8192**3 / seconds / 1e12


class Bench:
    """Holds the run's configuration and the results as they come."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = args.smoke
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.jobs = args.jobs
        self.steps = 3 if self.smoke else 50
        self.size = 64 if self.smoke else 512
        self.reps = 2 if self.smoke else 3
        self.results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d"),
            "steps": self.steps,
            "size": self.size,
            "guidance_scale": 7.5,
            "torch": torch.__version__,
        }
        self.model = str(self.work / "tiny-sd") if self.smoke else ""

    def job(self, seed: int) -> Txt2ImgJob:
        return Txt2ImgJob(
            prompt="a photograph of an astronaut riding a horse",
            width=self.size,
            height=self.size,
            steps=self.steps,
            guidance_scale=7.5,
            scheduler="euler",
            seed=seed,
        )

    def pipe_call(self, pipe: Any, batch: int = 1) -> Callable[[], Any]:
        return lambda: pipe(
            ["a photograph of an astronaut riding a horse"] * batch,
            num_inference_steps=self.steps,
            width=self.size,
            height=self.size,
            guidance_scale=7.5,
            output_type="pt",
        )


def prepare_model(bench: Bench) -> None:
    if bench.smoke:
        from sdqueue_worker.tiny_model import build_tiny_model

        build_tiny_model(bench.model)
        bench.results["device"] = "cpu (smoke run: numbers mean nothing)"
        return
    bench.results["device"] = torch.cuda.get_device_name()
    bench.results["matmul_bf16_tflops"] = matmul_tflops()
    began = time.perf_counter()
    bench.model = str(build_sd15(bench.work / "sd15"))
    log(f"SD 1.5-architecture model saved in {time.perf_counter() - began:.1f}s")


def seed_recipe(bench: Bench) -> None:
    """The original design: StableDiffusionPipeline in fp32, its default scheduler, one job at a time."""
    from diffusers import StableDiffusionPipeline

    device = "cpu" if bench.smoke else "cuda"
    pipe = StableDiffusionPipeline.from_pretrained(
        bench.model, torch_dtype=torch.float32, safety_checker=None
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    seconds = median_time(bench.pipe_call(pipe), bench.reps)
    bench.results["seed_recipe_s_per_image"] = seconds
    bench.results["seed_recipe_images_per_s"] = 1 / seconds
    del pipe
    free()


def plain_fp16(bench: Bench) -> None:
    """Plain diffusers fp16 batch 1, and the VRAM of txt2img alone vs txt2img + img2img."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    dtype, device = (torch.float32, "cpu") if bench.smoke else (torch.float16, "cuda")
    free()
    pipe = AutoPipelineForText2Image.from_pretrained(bench.model, dtype=dtype, safety_checker=None).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    t2i_bytes = allocated()
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    both_bytes = allocated()
    assert img2img.unet is pipe.unet
    seconds = median_time(bench.pipe_call(pipe), bench.reps)
    bench.results.update(
        {
            "diffusers_fp16_bs1_s_per_image": seconds,
            "diffusers_fp16_bs1_images_per_s": 1 / seconds,
            "vram_t2i_bytes": t2i_bytes,
            "vram_t2i_i2i_bytes": both_bytes,
            "vram_ratio_t2i_i2i": both_bytes / t2i_bytes if t2i_bytes else 1.0,
        }
    )
    del pipe, img2img
    free()


def allocated() -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


def free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker_env(bench: Bench, redis: RedisServer, moto: MotoServer) -> dict[str, str]:
    overrides: dict[str, Any] = {"max_batch": 8, "flush_window_ms": 20, "job_time_limit_s": 600}
    if not bench.smoke:
        overrides.update(
            device="cuda",
            compile="true",
            compile_batch_sizes="1,8",
            compile_cache_dir=str(bench.work / "inductor-cache"),
        )
    return stack_env(redis.url, moto.url, bench.model, **overrides)


def start_worker(bench: Bench, env: dict[str, str], name: str) -> tuple[WorkerProcess, float]:
    began = time.perf_counter()
    worker = WorkerProcess(bench.work, env, name=name).start(timeout=900)
    return worker, time.perf_counter() - began


def single_job_latency(bench: Bench, queue: SdQueue) -> None:
    """One interactive job at a time on an idle worker: submit -> result in hand."""
    latencies = []
    for seed in range(bench.reps + 2):
        began = time.perf_counter()
        queue.submit(bench.job(seed)).wait(timeout=600)
        latencies.append(time.perf_counter() - began)
    bench.results["single_job_latency_s"] = statistics.median(latencies[1:])
    bench.results["single_job_latencies_s"] = latencies


def heartbeat(queue: SdQueue, hostname: str) -> dict[str, Any]:
    return json.loads(queue.redis.get(f"sdq:worker:{hostname}") or "{}")


def saturated(bench: Bench, queue: SdQueue, worker: WorkerProcess) -> None:
    """A saturated queue of compatible jobs: images/s and the GPU thread's busy fraction."""
    queue.submit(bench.job(10_000), lane="bulk").wait(timeout=600)  # bucket warm at this size
    time.sleep(2 * queue.settings.lease_refresh_s)
    before = heartbeat(queue, worker.hostname)
    began = time.perf_counter()
    handles = [queue.submit(bench.job(20_000 + i), lane="bulk") for i in range(bench.jobs)]
    results = [handle.wait(timeout=1800) for handle in handles]
    wall = time.perf_counter() - began
    time.sleep(2 * queue.settings.lease_refresh_s)
    after = heartbeat(queue, worker.hostname)
    busy = after.get("busy_s", 0.0) - before.get("busy_s", 0.0)
    bench.results.update(
        {
            "worker_jobs": bench.jobs,
            "worker_wall_s": wall,
            "worker_images_per_s": bench.jobs / wall,
            "gpu_busy_fraction": min(1.0, busy / wall) if busy else None,
            "worker_batches": after.get("batches", 0) - before.get("batches", 0),
            "worker_generate_s_median": statistics.median(r.timings["generate_s"] for r in results),
        }
    )


def bare_pipeline(bench: Bench) -> None:
    """The same optimised pipeline called directly in this process (no queue, no storage)."""
    from sdqueue_worker.accel import optimise, warm_up
    from sdqueue_worker.runtime import load_runtime

    settings = WorkerSettings(
        model=bench.model,
        device="cpu" if bench.smoke else "cuda",
        compile=not bench.smoke,
        compile_batch_sizes=[1],
        compile_cache_dir=str(bench.work / "inductor-cache"),
    )
    runtime = load_runtime(settings)
    optimise(runtime, settings)
    bench.results["bare_pipeline_warmup_s"] = warm_up(runtime, settings)
    pipe = runtime.txt2img
    pipe.scheduler = runtime.schedulers["euler"]
    bench.results["bare_pipeline_latency_s"] = median_time(bench.pipe_call(pipe), bench.reps + 2)


def queue_phases(bench: Bench) -> None:
    redis = RedisServer(bench.work).start()
    moto = MotoServer(bench.work).start()
    try:
        env = worker_env(bench, redis, moto)
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        queue = SdQueue(Settings(redis_url=redis.url, s3_endpoint_url=moto.url))
        queue.storage.client.create_bucket(Bucket="sdqueue")
        worker, bench.results["cold_start_s"] = start_worker(bench, env, "cold")
        log(f"worker ready from cold in {bench.results['cold_start_s']:.1f}s")
        single_job_latency(bench, queue)
        log(f"single job latency {bench.results['single_job_latency_s']:.3f}s")
        saturated(bench, queue, worker)
        log(f"saturated {bench.results['worker_images_per_s']:.2f} images/s")
        worker.stop()
        worker, bench.results["cold_start_warm_cache_s"] = start_worker(bench, env, "warm")
        log(f"worker ready with a warm cache in {bench.results['cold_start_warm_cache_s']:.1f}s")
        worker.stop()
    finally:
        redis.stop()
        moto.stop()


def derived(results: dict[str, Any]) -> None:
    results["single_job_latency_ratio"] = results["single_job_latency_s"] / results["bare_pipeline_latency_s"]
    results["speedup_vs_seed_recipe"] = results["worker_images_per_s"] / results["seed_recipe_images_per_s"]
    results["speedup_vs_diffusers_fp16_bs1"] = (
        results["worker_images_per_s"] / results["diffusers_fp16_bs1_images_per_s"]
    )
    if results.get("matmul_bf16_tflops"):
        achieved = results["worker_images_per_s"] * UNET_TFLOP_PER_IMAGE_50 * results["steps"] / 50
        results["mfu"] = achieved / results["matmul_bf16_tflops"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", default="/tmp/sdq-bench")
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="CPU dry run with the tiny model")
    args = parser.parse_args()
    bench = Bench(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    phases = [prepare_model, seed_recipe, plain_fp16, queue_phases, bare_pipeline]
    for phase in phases:
        began = time.perf_counter()
        phase(bench)
        log(f"{phase.__name__} done in {time.perf_counter() - began:.1f}s")
        (Path(args.out) / "partial.json").write_text(json.dumps(bench.results, indent=1))
    derived(bench.results)
    path = write_report(bench.results, Path(args.out))
    print(json.dumps(bench.results, indent=1))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
