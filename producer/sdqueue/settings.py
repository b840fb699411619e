"""One typed settings object, read from the environment (prefix ``SDQ_``).

Producer and worker read the same object, so the Celery transport options (the visibility
timeout above all) are identical in every client of the broker. Secrets are ``SecretStr``
and never appear in ``repr`` or logs; URLs with passwords are shown masked.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger("sdqueue.settings")
ENV_PREFIX = "SDQ_"
WORKER_ONLY_NAMES = frozenset(
    {
        "max_jpeg_scans", "png_compress_level", "model", "model_revision", "device", "dtype",
        "gpu_memory_fraction", "compile", "compile_batch_sizes", "compile_cache_dir", "warmup",
        "max_batch", "flush_window_ms", "job_time_limit_s", "hard_limit_grace_s", "lease_refresh_s", "max_deliveries",
        "max_retries", "retry_backoff_s", "retry_backoff_max_s", "progress_interval_s",
        "heartbeat_file", "ready_file", "metrics_port", "metrics_addr", "webhook_secret",
        "webhook_max_attempts", "webhook_backoff_s", "webhook_backoff_max_s", "webhook_timeout_s",
        "notify_concurrency", "log_format", "accept_volatile_broker", "result_tracebacks", "attention",
        "compile_vae", "aot", "fp8", "model_variant", "single_file_config", "safety_checker", "model_alias",
        "lora_dir", "lora_cache_mb", "lora_max_rank",
    }
)  # fmt: skip
"""Fields of ``sdqueue_worker.settings.WorkerSettings`` (a unit test keeps this list equal to them),
so a web backend sharing the worker's environment is not warned about them."""
SERVER_ONLY_NAMES = frozenset(
    {
        "allow_callbacks", "api_keys", "api_keys_file", "concurrent_max_age_s", "max_concurrent",
        "openai_models", "openai_steps", "queue_scan_limit", "rate_burst", "rate_per_minute",
        "server_host", "server_port", "sse_interval_s", "sse_max_s", "sync_timeout_s",
    }
)  # fmt: skip
"""Fields of ``sdqueue.server.settings.ServerSettings`` beyond these (a unit test keeps them equal)."""
OTHER_NAMES = frozenset(
    {
        "SDQ_REDIS_ADDRESS",  # read by KEDA from the worker's environment (infra/)
        "SDQ_IMAGE_TAG",  # docker/compose.yaml
        "SDQ_GPU_TEST_MODEL",  # tests/integration/test_gpu.py
        "SDQ_GPU_TEST_HEADROOM_GB",
        "SDQ_FAULTS_VT",  # tests/integration/test_faults.py
    }
)
"""``SDQ_*`` variables that are not settings but are known to the project."""
_warned: set[str] = set()


def mask_url(url: str) -> str:
    """Hide the password of a URL such as ``redis://:secret@host:6379/0`` (each of a ``;`` list)."""
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Settings(BaseSettings):
    """The client's settings (what a web backend needs); the worker adds its own in
    ``sdqueue_worker.settings.WorkerSettings``. Field names map to ``SDQ_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=None, extra="ignore", use_attribute_docstrings=True
    )

    # --- broker and results -------------------------------------------------------------
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    """Broker and result backend; ``rediss://`` for TLS, ``redis://:password@host`` for auth,
    ``sentinel://h1:26379;sentinel://h2:26379;sentinel://h3:26379`` for Redis Sentinel."""
    redis_sentinel_master: str = "mymaster"
    """Master name the sentinels monitor, used when ``SDQ_REDIS_URL`` is ``sentinel://...`` (HA)."""
    redis_socket_timeout_s: float = 10.0
    """Seconds a Redis read or write may take before it fails (and is retried)."""
    redis_connect_timeout_s: float = 3.0
    """Seconds a new Redis connection may take."""
    submit_max_retries: int = 2
    """Publish retries before a submit fails with BrokerUnavailable (never hangs)."""
    result_ttl_s: int = 7 * 24 * 3600
    """How long Celery keeps a job's result, and the submit-side record of a job id lives."""
    output_record_ttl_s: int = 30 * 24 * 3600
    """How long the record of a job with its own output location lives (at least result_ttl_s):
    after the result expires, ``state()`` finds that job's manifest through it."""

    # --- object storage --------------------------------------------------------------------
    s3_endpoint_url: str | None = None
    """MinIO/moto/any S3-compatible endpoint; empty for AWS S3."""
    s3_region: str | None = None
    """Empty: botocore's own chain decides (AWS_REGION, AWS_DEFAULT_REGION, the profile)."""
    s3_public_endpoint_url: str | None = None
    """Endpoint written into presigned URLs, for when the one above is a name only reachable inside a
    private network (``http://minio:9000``): e.g. ``http://localhost:9000``. Empty: the endpoint above."""
    s3_access_key_id: SecretStr | None = None
    """S3 key id; unset: boto3's usual chain (AWS_* variables, instance role...)."""
    s3_secret_access_key: SecretStr | None = None
    """S3 secret key; unset: boto3's usual chain."""
    output_bucket: str = "sdqueue"
    """Bucket the images and manifests go to unless a job names another allowed one."""
    output_prefix: str = "outputs"
    """Key prefix of job folders: ``<prefix>/<job_id>/``."""
    output_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Further buckets a job may name as its output (the default bucket is always allowed)."""
    input_buckets: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["sdqueue"])
    """Allow-list of buckets img2img inputs may come from."""
    presign_expires_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    """Lifetime of presigned image URLs handed out by the client."""
    max_input_bytes: int = 20 * 1024 * 1024
    """Largest img2img input object the worker downloads."""
    max_input_pixels: int = 4096 * 4096
    """Input images over this many pixels are refused (checked from the header, before decoding)."""

    # --- models ------------------------------------------------------------------------------
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Model aliases a job may name in ``model`` (``SDQ_MODELS=sd15,sdxl``); each alias has its own
    queues and workers. Empty: jobs name no model and go to the default queues."""

    # --- delivery (both sides: the Celery transport options must agree) ---------------
    visibility_timeout_s: int = Field(default=20, ge=5)
    """A message whose worker stops renewing its lease for this long is redelivered."""

    # --- completion notifications ------------------------------------------------------------
    webhook_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """``host:port`` pairs a job's webhook_url may point at (a bare ``host`` means port 80/443);
    empty refuses all webhooks; the broker's own address is always refused."""
    callback_tasks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Task names a job's callback_task may name; empty refuses all callbacks."""
    callback_queues: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["celery"])
    """Queues a job's callback_queue may name (a job without one uses ``celery``)."""

    @field_validator(
        "input_buckets",
        "output_buckets",
        "webhook_hosts",
        "models",
        "callback_tasks",
        "callback_queues",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    def model_post_init(self, context: Any, /) -> None:
        warn_unknown_env(set(type(self).model_fields) | WORKER_ONLY_NAMES | SERVER_ONLY_NAMES)

    @property
    def allowed_output_buckets(self) -> list[str]:
        return [self.output_bucket, *self.output_buckets]

    @property
    def redis_url_masked(self) -> str:
        return mask_url(self.redis_url.get_secret_value())


def unknown_env(known_fields: Iterable[str], environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``(name, nearest known name or None)`` for each ``SDQ_*`` variable that is no setting."""
    known = sorted(ENV_PREFIX + name.upper() for name in known_fields)
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known and upper not in OTHER_NAMES:
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
            found.append((name, close[0] if close else None))
    return found


def warn_unknown_env(known_fields: Iterable[str], environ: Mapping[str, str] | None = None) -> None:
    """Log a warning, once per process and name, for each unknown ``SDQ_*`` variable (a typo such
    as ``SDQ_MAX_BACTH`` would otherwise be ignored silently)."""
    for name, nearest in unknown_env(known_fields, os.environ if environ is None else environ):
        if name in _warned:
            continue
        _warned.add(name)
        hint = f"; did you mean {nearest}?" if nearest else ""
        log.warning("unknown setting %s is ignored%s (all settings: docs/settings.md)", name, hint)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
