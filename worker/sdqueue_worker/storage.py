"""Object storage for the worker: input download with limits, idempotent output writes.

Outputs use deterministic keys per job id and conditional writes (``If-None-Match: *``): a
redelivered job finds its objects already there (HTTP 412) and treats that as done, so the first
complete write wins and nothing is written twice. The manifest is written last: it is the
commit marker, and readers trust only a job whose manifest exists.
"""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from sdqueue.errors import InputImageError, SdqError, StartupError, StorageUnavailable
from sdqueue.locations import ObjectRef
from sdqueue.storage import ALREADY_THERE_CODES, MISSING_CODES, Storage, classify_error, error_code

log = logging.getLogger(__name__)


class WorkerStorage(Storage):
    """The worker's view of the object store: reads inputs, writes outputs once."""

    def read_input(self, ref: ObjectRef) -> tuple[bytes, str]:
        """Download an input object after checking its size; returns (bytes, etag)."""
        limit = self.settings.max_input_bytes
        try:
            head = self.client.head_object(Bucket=ref.bucket, Key=ref.key)
            if head["ContentLength"] == 0:  # a ranged GET of an empty object answers 416 InvalidRange
                raise InputImageError(f"image_url {ref.url}: the object is empty; upload the image again")
            if head["ContentLength"] > limit:
                raise InputImageError(
                    f"image_url {ref.url}: {head['ContentLength']} bytes is over the {limit}-byte limit"
                )
            body = self.client.get_object(Bucket=ref.bucket, Key=ref.key, Range=f"bytes=0-{limit}")["Body"]
            data = body.read(limit + 1)
        except ClientError as exc:
            if error_code(exc) in MISSING_CODES or "404" in str(exc):
                raise InputImageError(f"image_url {ref.url}: no such object; upload it first") from None
            raise classify_error(exc, f"reading {ref.url}", InputImageError) from None
        except (BotoCoreError, BotoConnectionError) as exc:
            raise classify_error(exc, f"reading {ref.url}") from None
        if len(data) > limit:
            raise InputImageError(f"image_url {ref.url}: over the {limit}-byte limit")
        return data, str(head.get("ETag", "")).strip('"')

    def put_once(self, ref: ObjectRef, body: bytes, content_type: str, metadata: dict[str, str]) -> bool:
        """Create an object unless it exists. Returns False when it was already there."""
        try:
            self.client.put_object(
                Bucket=ref.bucket,
                Key=ref.key,
                Body=body,
                ContentType=content_type,
                Metadata=metadata,
                IfNoneMatch="*",
            )
            return True
        except ClientError as exc:
            if error_code(exc) in ALREADY_THERE_CODES:
                return False
            raise classify_error(exc, f"writing {ref.url}", bucket=ref.bucket) from None
        except (BotoCoreError, BotoConnectionError) as exc:
            raise classify_error(exc, f"writing {ref.url}") from None

    def read_json_quietly(self, ref: ObjectRef) -> dict[str, Any] | None:
        """``read_json``, with any storage fault read as "not there"."""
        try:
            return self.read_json(ref)
        except (SdqError, ValueError):
            return None

    def delete_quietly(self, refs: list[ObjectRef]) -> None:
        """Best-effort removal of objects (a job's images when its manifest cannot be written)."""
        for ref in refs:
            try:
                self.client.delete_object(Bucket=ref.bucket, Key=ref.key)
            except (ClientError, BotoCoreError, BotoConnectionError):
                log.warning("could not remove %s after a failed manifest write", ref.url)

    def probe_write(self, ref: ObjectRef) -> None:
        """Write a small object; raise StartupError naming the bucket and the permission on a
        refusal, StorageUnavailable when storage cannot be reached."""
        try:
            self.client.put_object(Bucket=ref.bucket, Key=ref.key, Body=b"sdqueue write probe\n")
        except (ClientError, BotoCoreError, BotoConnectionError) as exc:
            error = classify_error(exc, f"writing {ref.url}", bucket=ref.bucket)
            if isinstance(error, StorageUnavailable):
                raise error from None
            raise StartupError(f"the worker cannot write to its output bucket: {error}") from None
