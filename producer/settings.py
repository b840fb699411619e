"""One typed settings object, read from the environment (prefix ``SDQ_``).

Producer and worker read the same object, so the Celery transport options (the visibility
timeout above all) are identical in every client of the broker. Secrets are ``SecretStr``
and never appear in ``repr`` or logs; URLs with passwords are shown masked.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def mask_url(url: str) -> str:
    """Hide the password of a URL such as ``redis://:secret@host:6379/0``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Settings(BaseSettings):
    """Every knob of sdqueue. Field names map to ``SDQ_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SDQ_", env_file=None, extra="ignore")

    # --- broker and results -------------------------------------------------------------
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    """Broker and result backend; ``rediss://`` for TLS, ``redis://:password@host`` for auth."""
    redis_socket_timeout_s: float = 10.0
    redis_connect_timeout_s: float = 3.0
    submit_max_retries: int = 2
    """Publish retries before a submit fails with BrokerUnavailable (never hangs)."""
    result_ttl_s: int = 7 * 24 * 3600

    # --- object storage --------------------------------------------------------------------
    s3_endpoint_url: str | None = None
    """MinIO/moto/any S3-compatible endpoint; empty for AWS S3."""
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    output_bucket: str = "sdqueue"
    output_prefix: str = "outputs"
    output_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Further buckets a job may name as its output (the default bucket is always allowed)."""
    input_buckets: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["sdqueue"])
    """Allow-list of buckets img2img inputs may come from."""
    presign_expires_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    max_input_bytes: int = 20 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096
    png_compress_level: int = Field(default=1, ge=0, le=9)

    # --- model -----------------------------------------------------------------------------
    model: str = ".cache/tiny-sd"
    """A hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local diffusers folder."""
    model_revision: str | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    gpu_memory_fraction: float | None = Field(default=None, gt=0, le=1)
    """Cap this worker's share of GPU memory (torch.cuda.set_per_process_memory_fraction)."""
    compile: bool = False
    """torch.compile the UNet and VAE decoder with CUDA graphs (GPU only)."""
    compile_batch_sizes: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [1, 2, 4, 8])
    compile_cache_dir: str | None = None
    warmup: bool = True

    # --- worker behaviour ------------------------------------------------------------------
    max_batch: int = Field(default=1, ge=1, le=64)
    """Images the GPU thread may run in one pipeline call; 1 disables micro-batching."""
    flush_window_ms: float = Field(default=15.0, ge=0)
    """How long the GPU thread waits for compatible jobs still being prepared."""
    job_time_limit_s: float = Field(default=300.0, gt=0)
    """A job still generating after this long is stopped and fails."""
    visibility_timeout_s: int = Field(default=20, ge=5)
    """A message whose worker stops renewing its lease for this long is redelivered."""
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
    webhook_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Hosts (``host`` or ``host:port``) a job's webhook_url may point at; empty refuses all webhooks."""
    webhook_secret: SecretStr | None = None
    """HMAC-SHA256 key for webhook signatures (``whsec_<base64>`` or plain text)."""
    webhook_max_attempts: int = Field(default=5, ge=1, le=20)
    webhook_backoff_s: float = Field(default=2.0, gt=0)
    """First retry delay; doubles per attempt (with jitter) up to webhook_backoff_max_s."""
    webhook_backoff_max_s: float = Field(default=300.0, gt=0)
    webhook_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("input_buckets", "output_buckets", "compile_batch_sizes", "webhook_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @property
    def allowed_output_buckets(self) -> list[str]:
        return [self.output_bucket, *self.output_buckets]

    @property
    def redis_url_masked(self) -> str:
        return mask_url(self.redis_url.get_secret_value())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
