"""Arguments Flower shows for a message without ``argsrepr``/``kwargsrepr`` (a non-Python client)."""

from __future__ import annotations

import json
from typing import Any

from kombu import Message

from sdqueue.names import TXT2IMG_TASK
from sdqueue_worker.strategy import REPR_MAX_CHARS, fill_reprs, kwargs_repr


def message(kwargs: dict[str, Any], **headers: Any) -> Message:
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return Message(
        body=body,
        headers={"lang": "js", "task": TXT2IMG_TASK, "id": "raw-1", **headers},
        content_type="application/json",
        content_encoding="utf-8",
    )


def test_a_message_without_reprs_gets_its_kwargs_as_json() -> None:
    raw = message({"prompt": "a lighthouse", "steps": 2})
    fill_reprs(raw)
    assert raw.headers["argsrepr"] == "()"
    assert json.loads(raw.headers["kwargsrepr"]) == {"prompt": "a lighthouse", "steps": 2}


def test_reprs_a_producer_wrote_are_kept() -> None:
    raw = message({"prompt": "a lighthouse"}, argsrepr="()", kwargsrepr='{"prompt": "as sent"}')
    fill_reprs(raw)
    assert raw.headers["kwargsrepr"] == '{"prompt": "as sent"}'


def test_url_passwords_are_masked_and_the_repr_is_capped() -> None:
    shown = kwargs_repr({"webhook_url": "https://ops:hunter2@hooks.example/x", "prompt": "p" * 5000})
    assert "hunter2" not in shown and "https://ops:***@hooks.example/x" in shown
    assert len(shown) < REPR_MAX_CHARS + 50 and shown.endswith("more characters]")
    assert kwargs_repr({"prompt": "meet me @ noon"}) == '{"prompt": "meet me @ noon"}'
