"""Settings of ``sdqueue serve``: the client's (Redis, S3, allow-lists) plus the front door's own."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from sdqueue.settings import Settings


class ServerSettings(Settings):
    """Every knob of the HTTP front door. Field names map to ``SDQ_<NAME>`` environment variables."""

    server_host: str = "127.0.0.1"
    server_port: int = Field(default=8000, ge=1, le=65535)

    # --- API keys and fairness -------------------------------------------------------------
    api_keys: SecretStr | None = None
    """Comma-separated ``name:sha256hex[:lane]`` entries (``sdqueue api-key NAME`` makes one).
    With no keys here or in the file, the server is open (one tenant, ``anon``): development only."""
    api_keys_file: str | None = None
    """A file of the same entries, one a line, or a JSON list of ``{name, sha256, lane,
    rate_per_minute, max_concurrent}`` objects (per-key limits)."""
    rate_per_minute: int = Field(default=600, ge=1)
    """Submits (jobs, image requests, uploads) one key may make per minute (token bucket)."""
    rate_burst: int = Field(default=60, ge=1)
    """Submits a key may make at once before the per-minute rate applies."""
    max_concurrent: int = Field(default=32, ge=1)
    """Jobs of one key queued or running at once; more are refused with 429."""
    concurrent_max_age_s: int = Field(default=3600, ge=60)
    """A job counted against a quota for longer than this is no longer counted (lost jobs)."""

    # --- behaviour ----------------------------------------------------------------------------
    sync_timeout_s: float = Field(default=120.0, gt=0)
    """How long the OpenAI-compatible endpoints wait for their images before answering 504."""
    sse_interval_s: float = Field(default=0.25, gt=0)
    """How often an event stream looks at its job's progress."""
    sse_max_s: float = Field(default=3600.0, gt=0)
    openai_models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["sdqueue"])
    """Model names the OpenAI-compatible endpoints accept (all are served by the workers' SDQ_MODEL)."""
    openai_steps: int = Field(default=30, ge=1, le=150)
    """Denoising steps of an OpenAI-style request that names none (extension field ``steps``)."""
    allow_callbacks: bool = False
    """Let HTTP jobs name a Celery ``callback_task`` (off: a tenant could send tasks to your queues)."""
    queue_scan_limit: int = Field(default=1000, ge=1)
    """Queue position is looked up among this many oldest waiting messages per lane."""

    @field_validator("openai_models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


@lru_cache(maxsize=1)
def get_server_settings() -> ServerSettings:
    """The server process's settings, read once from the environment."""
    return ServerSettings()
