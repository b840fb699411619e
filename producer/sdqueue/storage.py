"""Object storage as the client sees it: an S3 client for the configured endpoint, presigned URLs,
manifest reads (a finished job's source of truth), and the mapping of S3 errors to sdqueue's.

The worker's side (input download with limits, conditional writes) is
``sdqueue_worker.storage``.
"""

from __future__ import annotations

import json
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from sdqueue.errors import StorageRefused, StorageUnavailable
from sdqueue.locations import ObjectRef
from sdqueue.settings import Settings

MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
ALREADY_THERE_CODES = {"412", "PreconditionFailed"}
RETRYABLE_CODES = {
    "500",
    "502",
    "503",
    "504",
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "ConditionalRequestConflict",
    "409",
}


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def classify_error(exc: Exception, what: str, refused: type[Exception] = StorageRefused) -> Exception:
    """Map a boto error to a permanent (``refused``) or transient sdqueue error."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in RETRYABLE_CODES or status in RETRYABLE_CODES:
            return StorageUnavailable(f"{what}: storage answered {code or status}")
        return refused(f"{what}: storage refused the request ({code or status})")
    return StorageUnavailable(f"{what}: storage unreachable ({type(exc).__name__})")


def make_s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the configured endpoint, with short timeouts and standard retries."""
    kwargs: dict[str, Any] = {"region_name": settings.s3_region}
    if settings.s3_endpoint_url:
        kwargs["endpoint_url"] = settings.s3_endpoint_url
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        kwargs["aws_access_key_id"] = settings.s3_access_key_id.get_secret_value()
        kwargs["aws_secret_access_key"] = settings.s3_secret_access_key.get_secret_value()
    config = Config(
        connect_timeout=3,
        read_timeout=20,
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path"},
        max_pool_connections=32,
        signature_version="s3v4",  # presigned URLs too: botocore signs them SigV2 in us-east-1 otherwise
    )
    return boto3.client("s3", config=config, **kwargs)


class Storage:
    """The client's view of the object store."""

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        self.settings = settings
        self.client = client or make_s3_client(settings)

    def presign(self, ref: ObjectRef, expires_s: int | None = None) -> str:
        """A presigned GET URL for an object."""
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": ref.bucket, "Key": ref.key},
            ExpiresIn=expires_s or self.settings.presign_expires_s,
        )
        return url

    def read_json(self, ref: ObjectRef) -> dict[str, Any] | None:
        """Read a JSON object, or None when it does not exist."""
        try:
            body = self.client.get_object(Bucket=ref.bucket, Key=ref.key)["Body"].read()
        except ClientError as exc:
            if error_code(exc) in MISSING_CODES:
                return None
            raise classify_error(exc, f"reading {ref.url}") from None
        except (BotoCoreError, BotoConnectionError) as exc:
            raise classify_error(exc, f"reading {ref.url}") from None
        manifest: dict[str, Any] = json.loads(body)
        return manifest
