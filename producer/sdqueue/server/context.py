"""What every request handler shares: settings, the sync client, keys, quotas."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from fastapi import Request

from sdqueue.client import Job, SdQueue
from sdqueue.locations import parse_object_url
from sdqueue.names import job_claim_key
from sdqueue.server.errors import ApiError, not_found
from sdqueue.server.keys import ANONYMOUS, ApiKey, hash_key, load_keys
from sdqueue.server.publish import Submitter
from sdqueue.server.quotas import Quotas, Refusal
from sdqueue.server.settings import ServerSettings
from sdqueue.server.status import StatusReader

IDEMPOTENCY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,94}$")
UPLOAD_PREFIX = "uploads"


@dataclass(frozen=True)
class Tenant:
    """The caller: its name scopes job ids and uploads; its limits come from its key or the defaults."""

    name: str
    lane: str | None
    rate_per_minute: int
    rate_burst: int
    max_concurrent: int

    def job_id(self, idempotency_key: str | None) -> str:
        """``{tenant}.{key}``: the same key gives the same job, for this tenant only."""
        if idempotency_key is None:
            return f"{self.name}.{uuid.uuid4().hex}"
        if not IDEMPOTENCY_PATTERN.fullmatch(idempotency_key):
            raise ApiError(
                422,
                "Idempotency-Key: use 1-95 letters, digits or . _ : - (starting with a letter or digit)",
                param="Idempotency-Key",
            )
        return f"{self.name}.{idempotency_key}"

    def owns(self, job_id: str) -> bool:
        return job_id.startswith(f"{self.name}.")

    @property
    def upload_prefix(self) -> str:
        return f"{UPLOAD_PREFIX}/{self.name}"


class Context:
    """Built once per process by ``create_app``."""

    def __init__(self, settings: ServerSettings, queue: SdQueue | None = None) -> None:
        self.settings = settings
        self.queue = queue or SdQueue(settings)
        self.keys = load_keys(
            settings.api_keys.get_secret_value() if settings.api_keys else None, settings.api_keys_file
        )
        self.quotas = Quotas(self.queue.redis, settings.concurrent_max_age_s)
        self.status = StatusReader(self.queue, settings.queue_scan_limit)
        self.submitter = Submitter(self.queue.celery, settings, settings.concurrent_max_age_s)

    @property
    def open(self) -> bool:
        """No keys configured: one anonymous tenant (development)."""
        return not self.keys

    def tenant_for(self, key: ApiKey | None) -> Tenant:
        s = self.settings
        return Tenant(
            key.name if key else ANONYMOUS,
            key.lane if key else None,
            (key.rate_per_minute if key else None) or s.rate_per_minute,
            s.rate_burst,
            (key.max_concurrent if key else None) or s.max_concurrent,
        )

    def authenticate(self, request: Request) -> Tenant:
        header = request.headers.get("authorization", "")
        secret = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key")
        if self.open:
            return self.tenant_for(None)
        challenge = {"WWW-Authenticate": "Bearer"}
        if not secret:
            raise ApiError(
                401,
                "authentication: send your API key as 'Authorization: Bearer <key>' (or X-API-Key)",
                "authentication_error",
                headers=challenge,
                code="missing_api_key",
            )
        key = self.keys.get(hash_key(secret))
        if key is None:
            raise ApiError(
                401,
                "authentication: this API key is not known",
                "authentication_error",
                headers=challenge,
                code="invalid_api_key",
            )
        return self.tenant_for(key)

    def owned_job(self, tenant: Tenant, job_id: str) -> str:
        """The job id if it exists and is this tenant's; 404 otherwise, the same either way."""
        if not tenant.owns(job_id) or not self.queue.redis.exists(job_claim_key(job_id)):
            raise not_found(job_id)
        return job_id

    def check_input(self, tenant: Tenant, image_url: str) -> None:
        """With keys on, a job may read only its own tenant's uploads (no reading another's inputs)."""
        if self.open:
            return
        ref = parse_object_url(image_url, self.settings.s3_endpoint_url)
        if not ref.key.startswith(tenant.upload_prefix + "/"):
            raise ApiError(
                422,
                f"image_url {image_url!r}: use an image you uploaded with POST /v1/uploads "
                "(keys read only their own uploads)",
                param="image_url",
            )

    def lane_for(self, tenant: Tenant, lane: str | None) -> str:
        if tenant.lane and lane not in (None, tenant.lane):
            raise ApiError(
                403,
                f"lane: this API key may submit to the {tenant.lane!r} lane only",
                "permission_error",
                param="lane",
                code="lane_not_allowed",
            )
        return lane or tenant.lane or "interactive"

    def take_token(self, tenant: Tenant) -> None:
        refusal = self.quotas.take_token(tenant.name, tenant.rate_per_minute, tenant.rate_burst)
        if refusal:
            raise too_many(refusal)

    async def submit(self, tenant: Tenant, spec: Job, job_id: str, lane: str, charge: bool) -> bool:
        """Claim, rate limit (when ``charge``), quota and enqueue: one Redis script; 429 with Retry-After.
        False when this exact job was submitted before (nothing new is queued)."""
        rate = (tenant.rate_per_minute, tenant.rate_burst) if charge else None
        outcome = await self.submitter.submit(tenant.name, spec, job_id, lane, tenant.max_concurrent, rate)
        if isinstance(outcome, Refusal):
            raise too_many(outcome)
        return outcome


def too_many(refusal: Refusal) -> ApiError:
    code = "rate_limit_exceeded" if refusal.message.startswith("rate") else "concurrency_quota_exceeded"
    return ApiError(
        429,
        refusal.message,
        "rate_limit_error",
        headers={"Retry-After": str(refusal.retry_after_s)},
        code=code,
    )


async def context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx
