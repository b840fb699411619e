"""GPU benchmark: sdqueue end to end against the do-it-yourself diffusers loop, in one run on one GPU.

    python -m benchmarks.gpu_bench --only sd15 --out DIR     # on the GPU machine, one part per call
    python -m benchmarks.gpu_bench --only sdxl --out DIR
    python -m benchmarks.gpu_bench --only fp8 --out DIR      # also: sdxl-fp8, steady, fp8-eager, sd15-worker
    python -m benchmarks.gpu_bench --only sd15-worker --aot  # the worker with AOT packages (SDQ_AOT=1)
    python -m benchmarks.gpu_bench --only steady --png-level 4  # PNG through Pillow (A/B the encoder)
    python -m benchmarks.gpu_bench --smoke                   # CPU dry run of every part, tiny models
    python -m benchmarks.report benchmarks/results/raw/*.json  # merge parts: JSON + table + plot

Each part writes ``<out>/<part>.json`` (raw, as measured) and merges into
``<report>/<gpu>-<date>.json`` (+ .md, .png); parts are described in docs/performance.md.
Workloads: SD 1.5 512x512, 50 steps; SDXL 1024x1024, 30 steps; guidance 7.5, Euler,
random-weight models at full architecture (timing does not depend on the weight values; no
image-quality claim is possible). The do-it-yourself baseline (benchmarks/diy.py)
runs at the worker's batch in the same run, after the worker, with the GPU otherwise idle.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import diy
from benchmarks.report import merge_into
from devstack.services import MotoServer, RedisServer, WorkerProcess, stack_env
from sdqueue import SdQueue, Txt2ImgJob
from sdqueue.names import worker_alive_key
from sdqueue.settings import Settings
from sdqueue_worker.settings import WorkerSettings

SD15_TFLOP_PER_IMAGE_50 = 82.9  # design brief: 50-step guided 512x512 image incl. VAE decode
SDXL_TFLOP_PER_IMAGE_30 = 416.0  # research/performance-turn2.md: 30 steps at 1024x1024
HEARTBEAT_WAIT_S = 2 * WorkerSettings().lease_refresh_s  # the worker's busy_s is this fresh
PARTS = ("sd15", "sdxl", "fp8", "sdxl-fp8", "steady", "fp8-eager", "sd15-worker")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Family:
    """One model family's workload."""

    name: str
    prefix: str  # key prefix in the results ("" for SD 1.5, "sdxl_" for SDXL)
    size: int
    steps: int
    batch: int
    jobs: int
    tflop_per_image: float


SD15 = Family("sd15", "", 512, 50, 8, 64, SD15_TFLOP_PER_IMAGE_50)
SDXL = Family("sdxl", "sdxl_", 1024, 30, 4, 32, SDXL_TFLOP_PER_IMAGE_30)


class Bench:
    """The run's configuration and the results as they come."""

    def __init__(self, args: argparse.Namespace, family: Family) -> None:
        self.smoke = args.smoke
        self.family = family
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if self.smoke else "cuda"
        self.size = 64 if self.smoke else family.size
        self.steps = 3 if self.smoke else family.steps
        self.batch = 2 if self.smoke else family.batch
        self.jobs = 4 if self.smoke else args.jobs or family.jobs
        self.reps = 2 if self.smoke else 3
        self.warm_restart = not args.no_warm_restart
        self.aot = args.aot
        self.png_level = args.png_level
        self.model = ""
        self.results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}

    def key(self, name: str) -> str:
        return self.family.prefix + name

    def put(self, name: str, value: Any) -> None:
        self.results[self.key(name)] = value
        log(f"{self.key(name)} = {value:.4g}" if isinstance(value, float) else f"{self.key(name)} = {value}")

    def job(self, seed: int) -> Txt2ImgJob:
        return Txt2ImgJob(
            prompt=diy.PROMPT,
            width=self.size,
            height=self.size,
            steps=self.steps,
            guidance_scale=7.5,
            scheduler="euler",
            seed=seed,
        )

    @property
    def half(self) -> torch.dtype:
        return torch.float32 if self.smoke else torch.bfloat16


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def allocated() -> int:
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds = diy.median_time(lambda: a @ b, 10, warm=3)
    return 2 * 8192**3 / seconds / 1e12


def prepare_model(bench: Bench) -> None:
    began = time.perf_counter()
    if bench.family is SD15:
        from benchmarks.sd15 import build_sd15

        if bench.smoke:
            from sdqueue_worker.tiny_model import build_tiny_model

            bench.model = str(build_tiny_model(Path(".cache/tiny-sd")))  # prebuilt by `make tiny-model`
        else:
            bench.model = str(build_sd15(bench.work / "sd15"))
    else:
        from benchmarks.sdxl import build_sdxl

        name = "tiny-sdxl" if bench.smoke else "sdxl"
        bench.model = str(build_sdxl(bench.work / name, device=bench.device, tiny=bench.smoke))
    bench.results["device"] = (
        "cpu (smoke run: numbers mean nothing)" if bench.smoke else torch.cuda.get_device_name()
    )
    if not bench.smoke:
        bench.results.setdefault("matmul_bf16_tflops", matmul_tflops())
    log(f"{bench.family.name} model ready in {time.perf_counter() - began:.1f}s")


# --- plain diffusers ---------------------------------------------------------------------------


def seed_recipe(bench: Bench) -> None:
    """The original design: StableDiffusionPipeline in fp32, its default PNDM scheduler, batch 1."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        bench.model, torch_dtype=torch.float32, safety_checker=None
    )
    pipe = pipe.to(bench.device)
    pipe.set_progress_bar_config(disable=True)

    def once(pipe: Any = pipe) -> None:
        with torch.inference_mode():
            pipe(
                diy.PROMPT,
                num_inference_steps=bench.steps,
                width=bench.size,
                height=bench.size,
                output_type="pt",
            )

    bench.put("seed_recipe_images_per_s", 1 / diy.median_time(once, 2 if not bench.smoke else 1))
    del pipe
    free()


def plain_eager(bench: Bench) -> None:
    """Plain diffusers fp16 eager at batch 1 and at the worker's batch; VRAM of txt2img vs + img2img."""
    from diffusers import AutoPipelineForImage2Image

    free()
    before = allocated()
    pipe = diy.load(bench.model, torch.float32 if bench.smoke else torch.float16, bench.device)
    t2i = allocated() - before
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    both = allocated() - before
    assert img2img.unet is pipe.unet
    bench.put("vram_ratio_t2i_i2i", both / t2i if t2i else 1.0)
    if bench.family is SD15:
        bench.put(
            "diffusers_fp16_bs1_images_per_s", diy.images_per_s(pipe, 1, bench.steps, bench.size, bench.reps)
        )
    bench.put("diffusers_eager_images_per_s", diy.images_per_s(pipe, bench.batch, bench.steps, bench.size, 2))
    if bench.family is SDXL and not bench.smoke:
        vae_decode_times(bench, pipe)
    del pipe, img2img
    free()


def vae_decode_times(bench: Bench, pipe: Any) -> None:
    """SDXL's VAE decode of one batch: fp32 (what fp16 pipelines upcast to) vs bf16."""
    latent = bench.size // pipe.vae_scale_factor
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        pipe.vae.to(dtype=dtype)
        latents = torch.randn(bench.batch, 4, latent, latent, device="cuda", dtype=dtype)

        def decode(vae: Any = pipe.vae, latents: torch.Tensor = latents) -> None:
            with torch.inference_mode():
                vae.decode(latents)

        bench.put(f"vae_decode_{name}_s", diy.median_time(decode, 3))
    pipe.vae.to(dtype=torch.float16)


def diy_compiled(
    bench: Bench, dtypes: list[torch.dtype], seeds: list[int] | None = None
) -> torch.Tensor | None:
    """The do-it-yourself baseline at the worker's batch; the best dtype's images/s is the baseline.
    With ``seeds``, also returns the first dtype's uint8 images for them."""
    import torch._dynamo

    best, images = 0.0, None
    priority = torch._C._get_sdp_priority_order()  # the user's defaults, not what the worker chose
    for dtype in dtypes:
        torch._C._set_sdp_priority_order(priority)
        pipe = diy.load(bench.model, dtype, bench.device)
        if not bench.smoke:
            diy.optimise(pipe, compiled=True)
        began = time.perf_counter()
        diy.call(pipe, list(range(bench.batch)), 2, bench.size)  # compile
        name = str(dtype).removeprefix("torch.")
        bench.put(f"diffusers_compiled_{name}_compile_s", time.perf_counter() - began)
        rate = diy.images_per_s(pipe, bench.batch, bench.steps, bench.size, bench.reps)
        bench.put(f"diffusers_compiled_{name}_images_per_s", rate)
        best = max(best, rate)
        if seeds is not None and images is None:
            images = diy.to_uint8(diy.call(pipe, seeds, bench.steps, bench.size))
        del pipe
        torch._dynamo.reset()
        free()
    bench.put("diffusers_compiled_images_per_s", best)
    return images


# --- sdqueue -----------------------------------------------------------------------------------


class Services:
    """redis-server + moto S3 + a client; workers come and go."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.redis = RedisServer(bench.work).start()
        self.moto = MotoServer(bench.work).start()
        os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
        self.queue = SdQueue(Settings(redis_url=self.redis.url, s3_endpoint_url=self.moto.url))
        self.queue.storage.client.create_bucket(Bucket="sdqueue")

    def env(self, cache: str, fp8: bool = False, buckets: str | None = None) -> dict[str, str]:
        bench = self.bench
        overrides: dict[str, Any] = {"max_batch": bench.batch, "flush_window_ms": 20, "job_time_limit_s": 900}
        if bench.png_level is not None:
            overrides["png_compress_level"] = bench.png_level
        if not bench.smoke:
            overrides.update(
                device="cuda",
                compile="true",
                compile_batch_sizes=buckets or f"1,{bench.batch}",
                compile_cache_dir=str(bench.work / cache),
                fp8="true" if fp8 else "false",
                aot="true" if bench.aot else "false",
            )
        env = stack_env(self.redis.url, self.moto.url, bench.model, **overrides)
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        return env

    def start(self, env: dict[str, str], name: str) -> tuple[WorkerProcess, float]:
        began = time.perf_counter()
        worker = WorkerProcess(self.bench.work, env, name=name).start(timeout=900)
        return worker, time.perf_counter() - began

    def stop(self) -> None:
        self.redis.stop()
        self.moto.stop()


def heartbeat(queue: SdQueue, hostname: str) -> dict[str, Any]:
    return json.loads(queue.redis.get(worker_alive_key(hostname)) or "{}")


def single_job_latency(bench: Bench, queue: SdQueue) -> None:
    """One interactive job at a time on an idle worker: submit -> result in hand."""
    latencies, timings = [], []
    for seed in range(bench.reps + 3):
        began = time.perf_counter()
        result = queue.submit(bench.job(seed)).wait(timeout=600)
        latencies.append(time.perf_counter() - began)
        timings.append(dict(result.timings, client_s=latencies[-1] - result.timings.get("total_s", 0.0)))
    bench.put("single_job_latency_s", statistics.median(latencies[1:]))
    bench.results[bench.key("single_job_latencies_s")] = latencies
    # where one job's time goes: the worker's own timings (manifest), the rest is queue + client
    keys = sorted(set.intersection(*(set(t) for t in timings[1:])))
    bench.put("single_job_phases_s", {k: statistics.median(t[k] for t in timings[1:]) for k in keys})


def saturated(bench: Bench, services: Services, worker: WorkerProcess, prefix: str = "") -> list[Any]:
    """Steady-state throughput of a saturated queue, and the GPU thread's busy fraction.

    The jobs are queued while the worker runs one longer job that cannot batch with them (twice
    the steps), so every batch is full from the first: the window runs from that job's result to
    the last job's result. Submitting into an idle worker instead starts with a partial batch (one
    padded bucket's time for a few images), which measures the ramp, not the engine.
    """
    queue = services.queue
    queue.submit(bench.job(10_000), lane="bulk").wait(timeout=900)  # this size warm
    time.sleep(HEARTBEAT_WAIT_S)
    before = heartbeat(queue, worker.hostname)
    blocker = queue.submit(bench.job(10_001).model_copy(update={"steps": 2 * bench.steps}), lane="bulk")
    handles = [queue.submit(bench.job(20_000 + i), lane="bulk") for i in range(bench.jobs)]
    blocked = blocker.wait(timeout=900).timings["generate_s"]
    began = time.perf_counter()
    results = [handle.wait(timeout=1800) for handle in handles]
    wall = time.perf_counter() - began
    time.sleep(HEARTBEAT_WAIT_S)
    after = heartbeat(queue, worker.hostname)
    busy = after.get("busy_s", 0.0) - before.get("busy_s", 0.0) - blocked  # the window's share
    rate = bench.jobs / wall
    bench.put(prefix + "worker_images_per_s", rate)
    bench.put(prefix + "gpu_busy_fraction", min(1.0, busy / wall) if busy else None)
    bench.put(prefix + "worker_batches", after.get("batches", 0) - before.get("batches", 0) - 1)
    if not bench.smoke:
        matmul = bench.results["matmul_bf16_tflops"]
        bench.put(
            prefix + "mfu", rate * bench.family.tflop_per_image * bench.steps / bench.family.steps / matmul
        )
    return results


def worker_pixels(services: Services, results: list[Any], count: int) -> torch.Tensor:
    """The first ``count`` images of a saturated run, decoded from the PNGs the worker stored."""
    from PIL import Image

    client = services.queue.storage.client
    arrays = []
    for result in results[:count]:
        image = result.images[0]
        body = client.get_object(Bucket=image.bucket, Key=image.key)["Body"].read()
        arrays.append(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")))
    return torch.from_numpy(np.stack(arrays))


def worker_phases(bench: Bench, services: Services, warm_restart: bool = True) -> None:
    """Cold start, single-job latency, saturated throughput, then a restart with a warm cache."""
    env = services.env(f"cache-{bench.family.name}")
    worker, cold = services.start(env, "cold")
    bench.put("cold_start_s", cold)
    try:
        single_job_latency(bench, services.queue)
        saturated(bench, services, worker)
        bench.put("cold_start_phases", heartbeat(services.queue, worker.hostname).get("startup"))
    finally:
        worker.stop()
    if warm_restart:
        worker, warm = services.start(env, "warm")
        bench.put("cold_start_warm_cache_s", warm)
        time.sleep(HEARTBEAT_WAIT_S)
        bench.put("warm_start_phases", heartbeat(services.queue, worker.hostname).get("startup"))
        worker.stop()


def bare_pipeline(bench: Bench) -> None:
    """The worker's own optimised pipeline called directly in this process at batch 1 (no queue)."""
    import torch._dynamo

    from sdqueue_worker.accel import optimise, warm_up
    from sdqueue_worker.runtime import load_runtime

    settings = WorkerSettings(
        model=bench.model,
        device=bench.device,
        compile=not bench.smoke,
        compile_batch_sizes=[1],
        compile_cache_dir=str(bench.work / f"cache-{bench.family.name}"),
        aot=bench.aot and not bench.smoke,
    )
    runtime = load_runtime(settings)
    optimise(runtime, settings)
    bench.put("attention_backend", runtime.attention)
    bench.put("bare_pipeline_warmup_s", warm_up(runtime, settings))
    pipe = runtime.txt2img
    pipe.scheduler = runtime.schedulers["euler"]
    bench.put(
        "bare_pipeline_latency_s",
        diy.median_time(lambda pipe=pipe: diy.call(pipe, [0], bench.steps, bench.size), 5),
    )
    engine_latencies(bench, runtime)
    del runtime, pipe
    torch._dynamo.reset()
    free()


def engine_latencies(bench: Bench, runtime: Any) -> None:
    """Where a single job's extra time over the bare call goes, in this process: the worker's
    ``run_batch`` called directly (its inputs, step callback, uint8 copy to the host), then the same
    through a ``GpuExecutor`` (the hand-off between a task thread and the GPU thread)."""
    import functools

    from sdqueue_worker.executor import GpuExecutor
    from sdqueue_worker.generation import GenerationRequest, run_batch

    def request() -> GenerationRequest:
        return GenerationRequest(job=bench.job(0), job_id="bench", seeds=[0], deadline=time.monotonic() + 600)

    bench.put(
        "run_batch_latency_s",
        diy.median_time(lambda: run_batch(runtime, [request()], lambda step: None, 1), 5),
    )
    executor = GpuExecutor(functools.partial(run_batch, runtime), 8, 0.015, time_limit_s=600, buckets=[1])
    executor.start()
    try:
        bench.put(
            "executor_latency_s", diy.median_time(lambda: executor.submit(request()).future.result(), 5)
        )
    finally:
        executor.stop()


# --- parts -------------------------------------------------------------------------------------


def share_cache(bench: Bench, cache: str) -> None:
    """This process compiles into the worker's cache: the baseline's compile time is not measured,
    and the inductor cache has no effect on steady-state speed."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(bench.work / cache)
    os.environ["TRITON_CACHE_DIR"] = str(bench.work / cache / "triton")


def part_sd15(bench: Bench) -> None:
    share_cache(bench, "cache-sd15")
    seed_recipe(bench)
    plain_eager(bench)
    sd15_worker_and_loops(bench, [bench.half] if bench.smoke else [torch.bfloat16, torch.float16])


def part_sd15_worker(bench: Bench) -> None:
    """The sd15 part without the seed recipe, eager and fp16 rows."""
    share_cache(bench, "cache-sd15")
    sd15_worker_and_loops(bench, [bench.half])


def sd15_worker_and_loops(bench: Bench, dtypes: list[torch.dtype]) -> None:
    """The worker (cold start, single jobs, saturated, warm restart), the bare pipeline and the
    do-it-yourself loop in ``dtypes``."""
    services = Services(bench)
    try:
        worker_phases(bench, services)
    finally:
        services.stop()
    bare_pipeline(bench)
    diy_compiled(bench, dtypes)


def part_sdxl(bench: Bench) -> None:
    share_cache(bench, "cache-sdxl")
    plain_eager(bench)
    services = Services(bench)
    try:
        worker_phases(bench, services, warm_restart=bench.warm_restart)
    finally:
        services.stop()
    diy_compiled(bench, [bench.half])


def part_fp8(bench: Bench) -> None:
    """The 16-bit and the FP8 worker with the batch bucket alone, the baseline, and FP8's
    deviation from the baseline's images on the same seeds."""
    share_cache(bench, f"cache-{bench.family.name}-bucket")
    services = Services(bench)
    try:
        for fp8, prefix in ((False, ""), (True, "fp8_")):
            cache = f"cache-{bench.family.name}-{'fp8' if fp8 else 'bucket'}"
            env = services.env(cache, fp8=fp8 and not bench.smoke, buckets=str(bench.batch))
            worker, cold = services.start(env, prefix + "worker")
            bench.put(prefix + "bucket_cold_start_s", cold)
            try:
                results = saturated(bench, services, worker, prefix=prefix)
            finally:
                worker.stop()
        fp8_pixels = worker_pixels(services, results, bench.batch)
    finally:
        services.stop()
    baseline = diy_compiled(bench, [bench.half], seeds=[20_000 + i for i in range(bench.batch)])
    assert baseline is not None
    for name, value in diy.deviation(fp8_pixels, baseline).items():
        bench.put(f"fp8_{name}", value)
    bench.put("fp8_baseline_images_per_s", bench.results[bench.key("diffusers_compiled_images_per_s")])


def part_steady(bench: Bench) -> None:
    """The 16-bit worker with the batch bucket alone, steady state, then the baseline (same run)."""
    share_cache(bench, f"cache-{bench.family.name}-bucket")
    services = Services(bench)
    try:
        env = services.env(f"cache-{bench.family.name}-bucket", buckets=str(bench.batch))
        worker, cold = services.start(env, "bucket-worker")
        bench.put("bucket_cold_start_s", cold)
        try:
            saturated(bench, services, worker)
        finally:
            worker.stop()
    finally:
        services.stop()
    diy_compiled(bench, [bench.half])


def part_fp8_eager(bench: Bench) -> None:
    """FP8 against bf16 on the same eager pipeline: the FP8 layers work here, and how far FP8's images
    move from bf16's on fixed seeds (eager speed understates FP8: its scaling is not fused)."""
    from sdqueue_worker.fp8 import quantize_unet_fp8

    pipe = diy.load(bench.model, bench.half, bench.device)
    seeds = [20_000 + i for i in range(bench.batch)]
    bench.put("fp8_eager_bf16_images_per_s", diy.images_per_s(pipe, bench.batch, bench.steps, bench.size, 2))
    reference = diy.to_uint8(diy.call(pipe, seeds, bench.steps, bench.size))
    if bench.smoke:
        return
    bench.put("fp8_layers", quantize_unet_fp8(pipe.unet))
    bench.put("fp8_eager_images_per_s", diy.images_per_s(pipe, bench.batch, bench.steps, bench.size, 2))
    fp8 = diy.to_uint8(diy.call(pipe, seeds, bench.steps, bench.size))
    for name, value in diy.deviation(fp8, reference).items():
        bench.put(f"fp8_eager_{name}", value)


RUNNERS = {
    "sd15": (SD15, part_sd15),
    "sd15-worker": (SD15, part_sd15_worker),
    "sdxl": (SDXL, part_sdxl),
    "fp8": (SD15, part_fp8),
    "sdxl-fp8": (SDXL, part_fp8),
    "steady": (SD15, part_steady),
    "fp8-eager": (SD15, part_fp8_eager),
}


def run_part(args: argparse.Namespace, part: str) -> dict[str, Any]:
    family, runner = RUNNERS[part]
    bench = Bench(args, family)
    began = time.perf_counter()
    prepare_model(bench)
    try:
        runner(bench)
    finally:
        bench.results[f"{part}_part_s"] = time.perf_counter() - began
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{part}.json").write_text(json.dumps(bench.results, indent=1) + "\n")
    return bench.results


def _stop(signum: int, _frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}: the part's JSON keeps what was measured")


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=PARTS, action="append", help="part(s) to run (default: all)")
    parser.add_argument("--out", default="benchmarks/results/raw")
    parser.add_argument("--report", default="benchmarks/results", help="where the merged report goes")
    parser.add_argument("--workdir", default="/tmp/sdq-bench")
    parser.add_argument("--jobs", type=int, default=0, help="saturated jobs (default: 64 SD 1.5, 32 SDXL)")
    parser.add_argument("--no-warm-restart", action="store_true", help="skip the warm-cache restart")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run with tiny models")
    parser.add_argument("--aot", action="store_true", help="workers and the bare pipeline with SDQ_AOT=1")
    parser.add_argument(
        "--png-level", type=int, default=None, help="workers' SDQ_PNG_COMPRESS_LEVEL (4-9: Pillow's encoder)"
    )
    args = parser.parse_args()
    for part in args.only or PARTS:
        results = run_part(args, part)
        path = merge_into(results, Path(args.report))
        log(f"{part} done; merged into {path}")


if __name__ == "__main__":
    main()
