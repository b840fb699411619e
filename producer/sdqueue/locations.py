"""Parse and allow-list object URLs. Used at submit and again in the worker.

Accepted input forms:

* ``s3://bucket/key``
* ``http(s)://<storage endpoint host[:port]>/bucket/key`` (path-style, as MinIO serves), only
  when the host is exactly the configured endpoint.

A URL names exactly one object: queries and fragments (``?``, ``#``) are refused rather than
dropped, so ``s3://b/a#b.png`` can never read ``b/a``; percent-encode them to name such a key.

Anything else (other hosts, link-local addresses, ``file://``, ``ftp://``...) is refused: the
worker never fetches an arbitrary URL; it reads the object through boto3 with its own
credentials.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from sdqueue.errors import InputImageError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class ObjectRef:
    """One object in one bucket."""

    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def job_folder(bucket: str, configured_prefix: str, job_prefix: str, job_id: str) -> ObjectRef:
    """Where a job's images and manifest go: ``{SDQ_OUTPUT_PREFIX}/{output.prefix}/{job_id}/`` in its
    output bucket. A job's own prefix is a sub-folder of the configured one, never outside it."""
    parts = (configured_prefix.strip("/"), job_prefix.strip("/"), job_id)
    return ObjectRef(bucket, "/".join(part for part in parts if part))


def manifest_ref(folder: ObjectRef) -> ObjectRef:
    """The manifest of a job folder: written last, the commit marker of a finished job."""
    return ObjectRef(folder.bucket, f"{folder.key}/manifest.json")


DEFAULT_PORTS = {"http": 80, "https": 443}


def url_port(parts: SplitResult, field: str, url: str) -> int:
    """The URL's port, or its scheme's default; a port out of range names the field."""
    try:
        port = parts.port
    except ValueError:
        raise InputImageError(
            f"{field} {url!r}: the port is not a number from 0 to 65535; fix the URL"
        ) from None
    return port or DEFAULT_PORTS.get(parts.scheme.lower(), 0)


def _endpoint_netloc(endpoint_url: str | None) -> tuple[str, str] | None:
    if not endpoint_url:
        return None
    parts = urlsplit(endpoint_url)
    port = url_port(parts, "SDQ_S3_ENDPOINT_URL", endpoint_url)
    return parts.scheme, f"{(parts.hostname or '').lower()}:{port}"


def _split_path(path: str, url: str) -> ObjectRef:
    bucket, _, key = path.lstrip("/").partition("/")
    key = unquote(key)
    if not _BUCKET.fullmatch(bucket) or not key or key.endswith("/"):
        raise InputImageError(f"image_url {url!r}: expected a bucket and an object key")
    if any(part in ("", ".", "..") for part in key.split("/")) or "\x00" in key:
        raise InputImageError(f"image_url {url!r}: the object key has empty, '.' or '..' segments")
    return ObjectRef(bucket, key)


def parse_object_url(url: str, endpoint_url: str | None) -> ObjectRef:
    """Turn an input URL into a bucket and key, or raise InputImageError."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if "?" in url or "#" in url:  # S3 clients differ on them: s3://b/a#b.png must never read b/a
        raise InputImageError(
            f"image_url {url!r}: '?' and '#' are not accepted (queries and fragments); "
            "rename the object or percent-encode the characters (%3F, %23)"
        )
    if scheme == "s3":
        return _split_path(f"{parts.netloc}/{parts.path.lstrip('/')}", url)
    if scheme in ("http", "https"):
        endpoint = _endpoint_netloc(endpoint_url)
        port = url_port(parts, "image_url", url)
        here = (scheme, f"{(parts.hostname or '').lower()}:{port}")
        if endpoint is None or here != endpoint or parts.username or parts.password:
            raise InputImageError(
                f"image_url {url!r}: http(s) URLs are accepted only on the storage endpoint "
                f"{endpoint_url or '(none configured)'}; use s3://bucket/key"
            )
        return _split_path(parts.path, url)
    raise InputImageError(
        f"image_url {url!r}: scheme {scheme or '(none)'!r} is not accepted; use s3://bucket/key"
    )


def check_allowed(ref: ObjectRef, allowed_buckets: list[str], url: str) -> ObjectRef:
    """Refuse buckets outside the allow-list."""
    if ref.bucket not in allowed_buckets:
        raise InputImageError(
            f"image_url {url!r}: bucket {ref.bucket!r} is not allowed for inputs; "
            f"allowed: {', '.join(allowed_buckets) or '(none)'}"
        )
    return ref


def allowed_input(url: str, endpoint_url: str | None, allowed_buckets: list[str]) -> ObjectRef:
    """Parse an input URL and check its bucket against the allow-list."""
    return check_allowed(parse_object_url(url, endpoint_url), allowed_buckets, url)
