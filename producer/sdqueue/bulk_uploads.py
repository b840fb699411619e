"""img2img inputs of a bulk file that name local files: uploaded once, keyed by content hash.

A line's ``image_url`` that has no URL scheme is a path (relative to the job file's folder, or to
the working directory for stdin). The file goes to ``s3://{input bucket}/bulk-inputs/{sha256}{ext}``
— the same bytes are one object however many lines or paths name them, and an object already
there (from an earlier run) is not sent again. The line then carries that s3:// URL, so its job id
(a hash of the spec) follows the file's content, not its name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdqueue.errors import InputImageError, StorageUnavailable

UPLOAD_PREFIX = "bulk-inputs"
CHUNK = 1 << 20


def is_local(image_url: str) -> bool:
    """A value without ``scheme://`` names a local file."""
    return "://" not in image_url


def _digest(path: Path, limit: int) -> str:
    size = path.stat().st_size
    if size > limit:
        raise InputImageError(f"image_url {str(path)!r}: {size} bytes is over the limit of {limit}")
    sha = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(CHUNK):
            sha.update(block)
    return sha.hexdigest()


class InputUploader:
    """Turns local paths into s3:// URLs of the input bucket, uploading each content once.

    With ``dry_run`` it only hashes the files (the URL is the same; nothing is sent). ``storage``
    gives the client's Storage when the first upload needs it (boto3 loads only then)."""

    def __init__(
        self, storage: Callable[[], Any], bucket: str, base: Path, max_bytes: int, dry_run: bool = False
    ) -> None:
        self.storage = storage
        self.bucket = bucket
        self.base = base
        self.max_bytes = max_bytes
        self.dry_run = dry_run
        self._by_file: dict[tuple[str, int, int], str] = {}
        self._sent: set[str] = set()
        self.uploaded = 0

    def url_for(self, value: str) -> str:
        """The s3:// URL of a local file named by a line (raises InputImageError if unusable)."""
        path = (self.base / os.path.expanduser(value)).resolve()
        try:
            stat = path.stat()
        except OSError as exc:
            raise InputImageError(
                f"image_url {value!r}: cannot read the local file ({exc.strerror})"
            ) from None
        if not path.is_file():
            raise InputImageError(f"image_url {value!r}: not a file")
        marker = (str(path), stat.st_size, stat.st_mtime_ns)
        if marker not in self._by_file:
            self._by_file[marker] = self._store(path)
        return self._by_file[marker]

    def _store(self, path: Path) -> str:
        key = f"{UPLOAD_PREFIX}/{_digest(path, self.max_bytes)}{path.suffix.lower()}"
        if not self.dry_run and key not in self._sent:
            self._upload(path, key)
            self._sent.add(key)
        return f"s3://{self.bucket}/{key}"

    def _upload(self, path: Path, key: str) -> None:
        client = self.storage().client
        try:
            client.head_object(Bucket=self.bucket, Key=key)
            return
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise StorageUnavailable(f"cannot check s3://{self.bucket}/{key}: {exc}") from None
        try:
            client.upload_file(str(path), self.bucket, key)
        except Exception as exc:
            raise StorageUnavailable(f"cannot upload {path} to s3://{self.bucket}/{key}: {exc}") from None
        self.uploaded += 1
