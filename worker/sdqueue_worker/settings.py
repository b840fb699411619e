"""The worker's settings: the client's (broker, storage, allow-lists) plus the worker's own.

Built once per worker process (``get_worker_settings``) and passed down explicitly; a web
backend's ``sdqueue.Settings`` never carries these fields.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from sdqueue.settings import Settings
from sdqueue.webhooks import check_secret


class WorkerSettings(Settings):
    """Every knob of the GPU worker. Field names map to ``SDQ_<NAME>`` environment variables."""

    # --- input images and output encoding (the size and pixel limits are shared: Settings) -----
    max_jpeg_scans: int = Field(default=64, ge=1)
    """Progressive JPEGs with more scans are refused before decoding (each scan decodes the whole
    image again: 60,000 scans took 28 s); ordinary encoders write about 10."""
    png_compress_level: int = Field(default=1, ge=0, le=9)
    """zlib level of the output PNGs (1: fast, 9: small). At levels 0-3 a job that ran alone in its
    batch is written by sdqueue's parallel encoder (strips deflated on threads, Sub filter); shared
    batches, and levels 4-9, by Pillow on one thread (4-9: its per-row filter choice, smaller, slower)."""

    # --- model -----------------------------------------------------------------------------
    model: str = ".cache/tiny-sd"
    """A hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local diffusers folder."""
    model_revision: str | None = None
    """Hub revision (commit, branch or tag) of the model; recorded in each manifest."""
    model_variant: str | None = None
    """Weight variant to load, e.g. ``fp16`` (files named ``*.fp16.safetensors``)."""
    single_file_config: str | None = None
    """For a single-file SDQ_MODEL: a diffusers folder or hub id with its configs (needed offline)."""
    safety_checker: bool = False
    """Run the model's NSFW checker and flag each image in the result (images are never blacked out)."""
    model_alias: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")
    """The alias (one of SDQ_MODELS) this worker serves: it consumes ``sdqueue.<alias>.*`` queues and
    runs only jobs naming it. Unset: the default queues and jobs that name no model."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """``auto``: CUDA when available, else CPU."""
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    """auto: bfloat16 on a GPU that supports it (faster, and SDXL's VAE needs no fp32 upcast), else
    float16 on a GPU, float32 on the CPU."""
    gpu_memory_fraction: float | None = Field(default=None, gt=0, le=1)
    """Cap this worker's share of GPU memory (torch.cuda.set_per_process_memory_fraction)."""
    compile: bool = False
    """torch.compile the UNet and VAE decoder with CUDA graphs (GPU only)."""
    compile_batch_sizes: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [1, 2, 4, 8])
    """Batch sizes compiled at warm-up with SDQ_COMPILE; other batches are padded up to one."""
    compile_cache_dir: str | None = None
    compile_vae: bool = True
    """With ``compile`` on, also compile the VAE decoder (fused GroupNorm/SiLU; no CUDA graphs)."""
    aot: bool = False
    """Experimental, with ``compile`` on: keep an AOTInductor package of the UNet and VAE decoder
    per batch bucket in the compile cache, so a warm start loads them instead of tracing again (refused
    with LoRAs and on torch < 2.13; not yet run on a GPU, see docs/performance.md)."""
    attention: Literal["auto", "default", "flash", "cudnn", "efficient"] = "auto"
    """SDPA backend put first on the GPU; auto times each on the UNet's own shapes at start-up."""
    fp8: bool = False
    """Opt-in FP8 UNet (linear layers and 1x1 convolutions in float8, bfloat16 only): faster, not identical."""
    warmup: bool = True
    """Run one tiny generation at start, before the worker takes jobs."""
    lora_dir: str | None = None
    """Folder of ``<name>.safetensors`` LoRA adapters jobs may name (unset: jobs may name none)."""
    lora_cache_mb: int = Field(default=512, ge=1)
    """Loaded adapters are kept while their file sizes add up to less than this."""
    lora_max_rank: int = Field(default=64, ge=1, le=1024)
    """With compile on: the highest adapter rank hot-swap must hold (enable_lora_hotswap)."""

    # --- worker behaviour ------------------------------------------------------------------
    max_batch: int = Field(default=1, ge=1, le=64)
    """Images the GPU thread may run in one pipeline call; 1 disables micro-batching."""
    flush_window_ms: float = Field(default=15.0, ge=0)
    """How long the GPU thread waits for compatible jobs still being prepared."""
    job_time_limit_s: float = Field(default=300.0, gt=0)
    """A job still generating after this long is stopped and fails."""
    hard_limit_grace_s: float = Field(default=60.0, gt=0)
    """The watchdog exits the worker (code 75) when one pipeline call outlives the time limit by
    this much without reaching a step; the message is redelivered, the delivery cap ends it."""
    lease_refresh_s: float = Field(default=2.0, gt=0)
    """How often the worker renews the leases of its running jobs and touches the heartbeat file."""
    max_deliveries: int = Field(default=3, ge=1)
    """A job that killed its worker this many times fails instead of running again."""
    max_retries: int = Field(default=5, ge=0)
    """Retries of a job after transient faults (storage or broker) before it fails."""
    retry_backoff_s: float = Field(default=1.0, gt=0)
    """First retry delay of a job; doubles per retry (with jitter)."""
    retry_backoff_max_s: float = Field(default=30.0, gt=0)
    """Longest retry delay of a job."""
    progress_interval_s: float = Field(default=0.25, ge=0)
    """How often a running job's progress is written to Redis and sent to Flower."""
    accept_volatile_broker: bool = False
    """Start even when Redis keeps nothing on disk (queued jobs and results die with a restart)."""
    result_tracebacks: bool = False
    """Store server tracebacks in failed results (debugging only; clients see messages otherwise)."""
    heartbeat_file: str | None = None
    """File the worker touches every lease_refresh_s (liveness probes read its age)."""
    ready_file: str | None = None
    """File created once the model is loaded and the worker consumes; removed at shutdown."""
    metrics_port: int | None = None
    """Serve Prometheus /metrics from the worker on this port (unset: no metrics server)."""
    metrics_addr: str = "0.0.0.0"
    """Address the metrics server binds to."""
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per log line, with job_id, lane, mode and model on a job's records."""

    # --- completion notifications ------------------------------------------------------------
    webhook_secret: SecretStr | None = None
    """HMAC-SHA256 key for webhook signatures, Standard Webhooks style: ``whsec_`` + base64 of 24 to
    64 random bytes (``echo whsec_$(openssl rand -base64 32)``). Other values are refused at start:
    receivers using a Standard Webhooks library could not verify them. Empty: unset."""
    webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    """Tries of one webhook delivery (the first included) before it is given up."""
    webhook_backoff_s: float = Field(default=2.0, gt=0)
    """First retry delay; doubles per attempt (with jitter) up to webhook_backoff_max_s."""
    webhook_backoff_max_s: float = Field(default=300.0, gt=0)
    """Longest wait between webhook tries (also caps a receiver's Retry-After)."""
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    """Seconds one webhook POST may take."""
    notify_concurrency: int = Field(default=8, ge=1, le=256)
    """Webhook deliveries ``sdqueue notifier`` runs at once (threads; each waits on its receiver)."""

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _standard_secret(cls, value: object) -> object:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        check_secret(str(raw))
        return value

    @field_validator("compile_batch_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


@lru_cache(maxsize=1)
def get_worker_settings() -> WorkerSettings:
    """The worker process's settings, read once from the environment."""
    return WorkerSettings()


def job_slots(max_batch: int) -> int:
    """Celery task threads feeding the GPU thread: 1 without micro-batching, else 2 x max_batch,
    so one batch can be prepared and uploaded while another runs. (Here, not in the executor:
    the launcher computes it before it execs Celery, and must not import torch for it.)"""
    return 1 if max_batch == 1 else 2 * max_batch
