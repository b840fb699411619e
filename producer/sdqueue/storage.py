"""Object storage as the client sees it: an S3 client for the configured endpoint, presigned URLs,
input uploads, manifest reads (a finished job's source of truth), and the mapping of S3 errors to
sdqueue's.

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


PERMISSIONS = {"writing": "s3:PutObject", "reading": "s3:GetObject", "deleting": "s3:DeleteObject"}
REFUSALS = {"AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def refusal_hint(code: str, what: str, bucket: str) -> str:
    """What to fix for a refusal: the missing bucket, or the permission the credentials lack."""
    if not bucket:
        return ""
    if code == "NoSuchBucket":
        return f"; bucket {bucket!r} does not exist: create it or fix SDQ_OUTPUT_BUCKET / output.bucket"
    if code in REFUSALS:
        permission = PERMISSIONS.get(what.split(" ", 1)[0], "access")
        return f"; the worker's credentials need {permission} on bucket {bucket!r}"
    return ""


def classify_error(
    exc: Exception, what: str, refused: type[Exception] = StorageRefused, bucket: str = ""
) -> Exception:
    """Map a boto error to a permanent (``refused``) or transient sdqueue error; a refusal names
    the bucket and the missing permission when ``bucket`` is given."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in RETRYABLE_CODES or status in RETRYABLE_CODES:
            return StorageUnavailable(f"{what}: storage answered {code or status}")
        hint = refusal_hint(code or status, what, bucket)
        return refused(f"{what}: storage refused the request ({code or status}){hint}")
    return StorageUnavailable(f"{what}: storage unreachable ({type(exc).__name__})")


def make_s3_client(settings: Settings, endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client for the configured endpoint (or ``endpoint_url``), with short timeouts and
    standard retries. The region is botocore's own (environment, profile) unless SDQ_S3_REGION is set."""
    kwargs: dict[str, Any] = {}
    if settings.s3_region:
        kwargs["region_name"] = settings.s3_region
    if endpoint_url or settings.s3_endpoint_url:
        kwargs["endpoint_url"] = endpoint_url or settings.s3_endpoint_url
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
        self._presigner: Any = None

    @property
    def presigner(self) -> Any:
        """The client that signs URLs: on the public endpoint when one is set (signing is local)."""
        if self._presigner is None:
            public = self.settings.s3_public_endpoint_url
            self._presigner = make_s3_client(self.settings, public) if public else self.client
        return self._presigner

    def presign(self, ref: ObjectRef, expires_s: int | None = None) -> str:
        """A presigned GET URL for an object."""
        url: str = self.presigner.generate_presigned_url(
            "get_object",
            Params={"Bucket": ref.bucket, "Key": ref.key},
            ExpiresIn=expires_s or self.settings.presign_expires_s,
        )
        return url

    def put(self, ref: ObjectRef, data: bytes, content_type: str) -> None:
        """Write one object; StorageUnavailable or StorageRefused when the store cannot or will not."""
        try:
            self.client.put_object(Bucket=ref.bucket, Key=ref.key, Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise classify_error(exc, f"writing {ref.url}") from None

    def get(self, ref: ObjectRef) -> bytes:
        """Read one object (used for results, which the worker wrote)."""
        try:
            body: bytes = self.client.get_object(Bucket=ref.bucket, Key=ref.key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise classify_error(exc, f"reading {ref.url}") from None
        return body

    def read_json(self, ref: ObjectRef) -> dict[str, Any] | None:
        """Read a JSON object, or None when it does not exist."""
        try:
            body = self.client.get_object(Bucket=ref.bucket, Key=ref.key)["Body"].read()
        except ClientError as exc:
            if error_code(exc) in MISSING_CODES:
                return None
            raise classify_error(exc, f"reading {ref.url}", bucket=ref.bucket) from None
        except (BotoCoreError, BotoConnectionError) as exc:
            raise classify_error(exc, f"reading {ref.url}") from None
        manifest: dict[str, Any] = json.loads(body)
        return manifest
