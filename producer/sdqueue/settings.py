"""One typed settings object, read from the environment (prefix ``SDQ_``).

Producer and worker read the same object, so the Celery transport options (the visibility
timeout above all) are identical in every client of the broker. Secrets are ``SecretStr``
and never appear in ``repr`` or logs; URLs with passwords are shown masked.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated
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
    """The client's settings (what a web backend needs); the worker adds its own in
    ``sdqueue_worker.settings.WorkerSettings``. Field names map to ``SDQ_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SDQ_", env_file=None, extra="ignore")

    # --- broker and results -------------------------------------------------------------
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    """Broker and result backend; ``rediss://`` for TLS, ``redis://:password@host`` for auth."""
    redis_socket_timeout_s: float = 10.0
    redis_connect_timeout_s: float = 3.0
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

    # --- models ------------------------------------------------------------------------------
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Model aliases a job may name in ``model`` (``SDQ_MODELS=sd15,sdxl``); each alias has its own
    queues and workers. Empty: jobs name no model and go to the default queues."""

    # --- delivery (both sides: the Celery transport options must agree) ---------------
    visibility_timeout_s: int = Field(default=20, ge=5)
    """A message whose worker stops renewing its lease for this long is redelivered."""

    # --- completion notifications ------------------------------------------------------------
    webhook_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Hosts (``host`` or ``host:port``) a job's webhook_url may point at; empty refuses all webhooks."""

    @field_validator("input_buckets", "output_buckets", "webhook_hosts", "models", mode="before")
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
