"""sdqueue's webhook signer against the Standard Webhooks reference library (``standardwebhooks``),
both ways, and the secrets the worker accepts."""

from __future__ import annotations

import base64
import json
import os
import time
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from sdqueue.webhooks import check_secret, signed_headers, verify
from sdqueue_worker.settings import WorkerSettings

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BODY = json.dumps({"type": "job.succeeded", "data": {"job_id": "j1", "state": "succeeded"}}).encode()


def test_the_reference_library_verifies_what_sdqueue_signs() -> None:
    headers = signed_headers(SECRET, "msg_1", BODY)
    assert Webhook(SECRET).verify(BODY, headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY.replace(b"succeeded", b"failed"), headers)
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(BODY, headers)


def test_sdqueue_verifies_what_the_reference_library_signs() -> None:
    now = time.time()
    signature = Webhook(SECRET).sign(
        "msg_2", datetime.fromtimestamp(int(now), tz=timezone.utc), BODY.decode()
    )
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(int(now)), "webhook-signature": signature}
    verify(SECRET, headers, BODY, now=now)


def test_secrets_without_the_whsec_prefix_are_refused() -> None:
    assert len(check_secret(SECRET)) == 32
    for bad, why in (
        ("plain-text-secret-of-some-length", "whsec_"),
        ("whsec_not*base64!", "base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64 bytes"),
    ):
        with pytest.raises(ValueError, match=why):
            check_secret(bad)
        with pytest.raises(ValidationError, match=why):
            WorkerSettings(webhook_secret=bad)
    assert WorkerSettings(webhook_secret="").webhook_secret is None
    accepted = WorkerSettings(webhook_secret=SECRET).webhook_secret
    assert accepted is not None and accepted.get_secret_value() == SECRET
