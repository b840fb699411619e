"""Signed completion webhooks, Standard Webhooks style (https://www.standardwebhooks.com).

The worker signs and sends; a web backend verifies with :func:`verify` (this module needs no
torch, so a backend that installs only the producer package has it). Each request carries:

* ``webhook-id``: stable for one job outcome, the same on every retry (deduplicate on it);
* ``webhook-timestamp``: Unix seconds of this attempt (refuse old ones: replay protection);
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``.

Webhook URLs may point only at ``host:port`` pairs on the allow-list ``SDQ_WEBHOOK_HOSTS`` (a bare
host means the default port of the URL's scheme), never at sdqueue's own Redis: checked at submit
and again in the worker, and redirects are never followed (no server-side request forgery).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from sdqueue.errors import JobValidationError, WebhookSignatureError

SIGNATURE_VERSION = "v1"
DEFAULT_PORTS = {"http": 80, "https": 443}
DEFAULT_TOLERANCE_S = 300


def check_secret(secret: str) -> bytes:
    """The key of a Standard Webhooks secret, ``whsec_`` + base64 of 24-64 bytes; ValueError otherwise.

    The worker refuses other secrets at start (SDQ_WEBHOOK_SECRET): a receiver using a Standard
    Webhooks library base64-decodes the secret, so a plain-text one could never verify there.
    """
    if not secret.startswith("whsec_"):
        raise ValueError(
            "a webhook secret must start with whsec_ (generate one: echo whsec_$(openssl rand -base64 32))"
        )
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        raise ValueError("a webhook secret is whsec_ followed by base64; this one is not base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a webhook secret must hold 24 to 64 bytes once decoded, not {len(key)}")
    return key


def secret_bytes(secret: str) -> bytes:
    """The HMAC key: ``whsec_<base64>`` secrets are decoded, anything else is used as UTF-8 (accepted
    by :func:`verify` for receivers of old plain-text setups; the worker signs only with whsec_)."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def allowed_netlocs(entries: list[str], scheme: str) -> set[str]:
    """``host:port`` of each allow-list entry; a bare ``host`` means the scheme's default port."""
    default = DEFAULT_PORTS[scheme]
    found = set()
    for entry in entries:
        entry = entry.strip().lower()
        if not entry:
            continue
        parts = urlsplit(f"//{entry}")
        try:
            port = parts.port or default
        except ValueError:
            continue  # an entry with a broken port admits nothing
        found.add(_netloc(parts.hostname or "", port))
    return found


def service_netlocs(urls: list[str]) -> set[str]:
    """``host:port`` of the broker and result backend: never a webhook target."""
    found = set()
    for url in urls:
        parts = urlsplit(url)
        try:
            port = parts.port or 6379
        except ValueError:
            continue
        found.add(_netloc((parts.hostname or "").lower(), port))
    return found


def check_webhook_url(url: str, allowed_hosts: list[str], forbidden: set[str] | None = None) -> str:
    """Return the URL if its host and port are allow-listed; raise JobValidationError otherwise.

    An entry ``host:port`` allows that port only; a bare ``host`` allows the URL scheme's
    default port (80 or 443) only. ``forbidden`` (``host:port`` of the broker and result
    backend) is refused even when listed.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        raise JobValidationError(f"webhook_url {url!r}: must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise JobValidationError(f"webhook_url {url!r}: credentials in the URL are not accepted")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise JobValidationError(f"webhook_url {url!r}: the port is not a number from 0 to 65535") from None
    here = _netloc(host, port)
    if here in (forbidden or set()):
        raise JobValidationError(
            f"webhook_url {url!r}: {here} is sdqueue's own Redis; webhooks never go there"
        )
    allowed = allowed_netlocs(allowed_hosts, scheme)
    if here not in allowed:
        raise JobValidationError(
            f"webhook_url {url!r}: {here} is not allowed for webhooks (a bare host in "
            "SDQ_WEBHOOK_HOSTS means port 80/443; add host:port for another port); "
            f"allowed: {', '.join(sorted(allowed)) or '(none: set SDQ_WEBHOOK_HOSTS)'}"
        )
    return url


def webhook_id(job_id: str, state: str) -> str:
    """The stable message id of one job outcome (the same on every retry and redelivery)."""
    return "msg_" + hashlib.sha256(f"{job_id}\x00{state}".encode()).hexdigest()[:32]


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signed_headers(secret: str, msg_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """Headers for one delivery attempt: id, timestamp and signature."""
    timestamp = int(now if now is not None else time.time())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a received webhook; raises WebhookSignatureError unless it is authentic and recent."""
    lowered = {key.lower(): value for key, value in headers.items()}
    msg_id, stamp = lowered.get("webhook-id"), lowered.get("webhook-timestamp", "")
    signatures = lowered.get("webhook-signature", "").split()
    if not msg_id or not stamp.isdigit() or not signatures:
        raise WebhookSignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if abs((now if now is not None else time.time()) - int(stamp)) > tolerance_s:
        raise WebhookSignatureError(f"webhook-timestamp {stamp} is outside the {tolerance_s}s tolerance")
    expected = sign(secret, msg_id, int(stamp), body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures):
        raise WebhookSignatureError("webhook-signature does not match the body")
