"""Celery task messages for bulk jobs, built from a template and pushed straight onto the lane list.

``app.amqp.create_task_message`` plus kombu's publish cost ~200 us a job; this builds the same
message (Celery protocol 2, kombu's Redis envelope: base64 body, ``delivery_info``, a unique
``delivery_tag``) from a template in a few microseconds, and one Lua script per batch takes each
job's idempotency claim and LPUSHes its message in one round trip, only while the lane's list is
shorter than a cap. Claim and message go in together, so a crash never leaves a claim without its
message, and several bulk runs side by side never push the lane past the cap between them.

tests/unit/test_bulk_wire.py checks the message against Celery's own, field by field.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import time
import uuid
from base64 import b64encode
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as json_string  # json.dumps of a str
from typing import Any

from sdqueue.names import TASK_FOR_MODE, job_claim_key

PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's Redis transport keeps priority p of queue q in the list ``q\\x06\\x16p`` (p > 0) and
priority 0 in ``q`` itself; the worker drains them by priority (``queue_order_strategy``)."""

EMBED = ', {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'

PUSH_SCRIPT = """
local cap = tonumber(ARGV[1])
local jobs = ARGV[2]
local depth = 0
for i = 1, 4 do depth = depth + redis.call('LLEN', KEYS[i]) end
local flags = {}
local out = {''}
local at = 1
for i = 5, #KEYS do
  local ttl, claim_len, message_len, start = string.match(jobs, '^(%d+) (%d+) (%d+)\\n()', at)
  local claim_end = start + tonumber(claim_len)
  at = claim_end + tonumber(message_len)
  if cap > 0 and depth >= cap then
    flags[#flags + 1] = '0'
  elseif redis.call('SET', KEYS[i], string.sub(jobs, start, claim_end - 1), 'NX', 'EX', ttl) then
    redis.call('LPUSH', KEYS[1], string.sub(jobs, claim_end, at - 1))
    depth = depth + 1
    flags[#flags + 1] = '1'
  else
    flags[#flags + 1] = 'c'
    out[#out + 1] = redis.call('GET', KEYS[i]) or ''
  end
end
out[1] = table.concat(flags)
return out
"""
"""KEYS: the lane's four priority lists, then one claim key per job. ARGV: cap (0: none), then
every job of the batch in one argument, each as ``{ttl} {claim length} {message length}\\n``, its
claim value and its message (ASCII JSON: lengths in characters are lengths in bytes). One argument
a batch, not three a job, spares the client packing 1,500 arguments. Returns one flag a job, as a
string: 1 (pushed), 0 (deferred: lane full) or c (claimed: an earlier submit took the job id),
then the claim each c found, in order (one reply element a batch, not one a job)."""


def lane_lists(queue_name: str) -> list[str]:
    """The Redis lists that hold a lane's messages, priority 0 first."""
    return [queue_name] + [f"{queue_name}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS[1:]]


@dataclass(frozen=True)
class WireJob:
    """One job as the push script needs it."""

    job_id: str
    mode: str
    kwargs_json: str
    """The task kwargs as JSON."""
    claim: str
    """The value of its claim key (the submit-side idempotency record)."""
    claim_ttl_s: int


@dataclass(frozen=True)
class Pushed:
    """What the push script did with one job."""

    pushed: bool
    deferred: bool
    claim: dict[str, Any] | None
    """The earlier claim, when another submit had already taken this job id."""


FIELDS = ("BODY", "TASK", "ID", "KWARGSREPR", "ORIGIN", "SUBMITTED_AT", "DELIVERY_TAG")


def _envelope(queue_name: str, mark: Callable[[str], Any]) -> dict[str, Any]:
    """The message as kombu stores it, with ``mark(name)`` where a value differs per job."""
    headers = {
        "lang": "py",
        "task": mark("TASK"),
        "id": mark("ID"),
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": mark("ID"),
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": mark("KWARGSREPR"),
        "origin": mark("ORIGIN"),
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        "sdq_submitted_at": mark("SUBMITTED_AT"),
    }
    properties = {
        "correlation_id": mark("ID"),
        "reply_to": "",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue_name},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": mark("DELIVERY_TAG"),
    }
    return {
        "body": mark("BODY"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }


class MessageTemplate:
    """Builds the Redis message of one job on one lane, as Celery and kombu would.

    The envelope is serialised once with a marker for each per-job value; a message is the
    literal pieces joined with that job's JSON-encoded values (no per-job dict or json.dumps of it)."""

    def __init__(self, queue_name: str) -> None:
        self.queue_name = queue_name
        self.origin = json.dumps(f"{os.getpid()}@{socket.gethostname()}")
        text = json.dumps(_envelope(queue_name, lambda name: f"@@{name}@@"))
        pieces = re.split(r'"@@([A-Z_]+)@@"', text)
        literals, slots = pieces[0::2], pieces[1::2]
        assert set(slots) == set(FIELDS), slots
        # One %-format of the whole envelope: a message is a single C-level substitution.
        self.format = literals[0].replace("%", "%%") + "".join(
            f"%({slot})s" + literal.replace("%", "%%")
            for slot, literal in zip(slots, literals[1:], strict=True)
        )
        self.tasks = {mode: json.dumps(task) for mode, task in TASK_FOR_MODE.items()}
        # kombu keys its unacked hash by delivery tag, so tags need only be unique: a random
        # prefix per template and a counter cost less than a uuid4 per message.
        self.tag_prefix, self.tags = str(uuid.uuid4()), itertools.count()

    def build(self, job_id: str, mode: str, kwargs_json: str) -> str:
        """The JSON text LPUSHed onto the lane's list; ``kwargs_json`` is the task kwargs as JSON."""
        body = b64encode(("[[], " + kwargs_json + EMBED).encode()).decode()
        return self.format % {
            "BODY": f'"{body}"',
            "TASK": self.tasks[mode],
            "ID": json_string(job_id),
            "KWARGSREPR": json_string(kwargs_json),
            "ORIGIN": self.origin,
            "SUBMITTED_AT": repr(time.time()),
            "DELIVERY_TAG": f'"{self.tag_prefix}.{next(self.tags)}"',
        }


class LanePusher:
    """Claims job ids and pushes their messages, one script call per batch."""

    def __init__(self, redis: Any, queue_name: str) -> None:
        self.redis = redis
        self.lists = lane_lists(queue_name)
        self.template = MessageTemplate(queue_name)
        self.script = redis.register_script(PUSH_SCRIPT)

    def depth(self) -> int:
        """Messages waiting on the lane, all priorities."""
        pipe = self.redis.pipeline(transaction=False)
        for name in self.lists:
            pipe.llen(name)
        return sum(int(n) for n in pipe.execute())

    def push(self, jobs: Sequence[WireJob], cap: int) -> list[Pushed]:
        """Claim and push jobs, in order, while the lane holds fewer than ``cap`` messages (0: no cap)."""
        keys = self.lists + [job_claim_key(job.job_id) for job in jobs]
        build = self.template.build
        parts: list[str] = []
        for job in jobs:
            message = build(job.job_id, job.mode, job.kwargs_json)
            parts += (f"{job.claim_ttl_s} {len(job.claim)} {len(message)}\n", job.claim, message)
        blob = "".join(parts)
        if not blob.isascii():
            raise ValueError("bulk messages and claims are ASCII JSON")  # their lengths are byte counts
        args = [str(cap), blob]
        flags, *claims = self.script(keys=keys, args=args)
        found = iter(claims)
        return [
            PUSHED if flag == "1" else DEFERRED if flag == "0" else _claimed(next(found))
            for flag in _text(flags)
        ]


PUSHED = Pushed(True, False, None)
DEFERRED = Pushed(False, True, None)


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _claimed(reply: Any) -> Pushed:
    text = _text(reply)
    try:
        claim = json.loads(text) if text else {}
    except json.JSONDecodeError:
        claim = {}
    return Pushed(False, False, claim if isinstance(claim, dict) else {})
