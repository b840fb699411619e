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


class WorkerSettings(Settings):
    """Every knob of the GPU worker. Field names map to ``SDQ_<NAME>`` environment variables."""

    # --- input images and output encoding ------------------------------------------------------
    max_input_pixels: int = 4096 * 4096
    png_compress_level: int = Field(default=1, ge=0, le=9)

    # --- model -----------------------------------------------------------------------------
    model: str = ".cache/tiny-sd"
    """A hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local diffusers folder."""
    model_revision: str | None = None
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
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    gpu_memory_fraction: float | None = Field(default=None, gt=0, le=1)
    """Cap this worker's share of GPU memory (torch.cuda.set_per_process_memory_fraction)."""
    compile: bool = False
    """torch.compile the UNet and VAE decoder with CUDA graphs (GPU only)."""
    compile_batch_sizes: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [1, 2, 4, 8])
    compile_cache_dir: str | None = None
    warmup: bool = True
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
    lease_refresh_s: float = Field(default=2.0, gt=0)
    max_deliveries: int = Field(default=3, ge=1)
    """A job that killed its worker this many times fails instead of running again."""
    max_retries: int = Field(default=5, ge=0)
    retry_backoff_s: float = Field(default=1.0, gt=0)
    retry_backoff_max_s: float = Field(default=30.0, gt=0)
    progress_interval_s: float = Field(default=0.25, ge=0)
    heartbeat_file: str | None = None
    ready_file: str | None = None
    metrics_port: int | None = None
    """Serve Prometheus /metrics from the worker on this port (unset: no metrics server)."""
    metrics_addr: str = "0.0.0.0"

    # --- completion notifications ------------------------------------------------------------
    webhook_secret: SecretStr | None = None
    """HMAC-SHA256 key for webhook signatures (``whsec_<base64>`` or plain text)."""
    webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    webhook_backoff_s: float = Field(default=2.0, gt=0)
    """First retry delay; doubles per attempt (with jitter) up to webhook_backoff_max_s."""
    webhook_backoff_max_s: float = Field(default=300.0, gt=0)
    webhook_timeout_s: float = Field(default=5.0, gt=0)

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
