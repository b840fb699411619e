"""schemathesis against the OpenAPI document of a running ``sdqueue serve``: no 5xx for any input it
generates (but the documented 504 of a synchronous images request on a stack without a worker), and
every response matches the document (status, content type, body schema)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from devstack.server import ServerProcess
from devstack.services import MotoServer
from sdqueue.server.keys import hash_key
from tests.helpers import own_stack

KEY = "sdq_schemathesis"


@pytest.fixture(scope="module")
def api(logdir: Path, moto: MotoServer, tiny_model: str) -> Iterator[ServerProcess]:
    """No worker: generated jobs stay queued; the OpenAI endpoints answer 504 after one second."""
    with own_stack(logdir, moto.url, tiny_model, "schema", with_worker=False, sync_timeout_s=1) as st:
        keys = logdir / "schema-keys.json"
        keys.write_text(json.dumps([{"name": "fuzz", "sha256": hash_key(KEY), "rate_per_minute": 100000}]))
        env = {
            **st.env,
            "SDQ_API_KEYS_FILE": str(keys),
            "SDQ_RATE_BURST": "1000",
            "SDQ_MAX_CONCURRENT": "100000",
        }
        process = ServerProcess(logdir, env, name="schema-server").start()
        try:
            yield process
        finally:
            process.stop()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_openapi_document_holds(api: ServerProcess) -> None:
    """A bounded run (a few examples per operation); the event stream is left out (it never ends for
    a queued job) and is covered by test_server.py."""
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if not op.path.endswith("/events")]
    assert len(operations) >= 6
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def run(case: schemathesis.Case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            if (
                response.status_code == 504
            ):  # no worker here: a well-formed OpenAI request waits and times out
                assert response.json()["error"]["code"] == "timeout"
                case.validate_response(response, checks=CHECKS[1:])
            else:
                case.validate_response(response, checks=CHECKS)

        run()
