"""Both JSON texts a bulk job needs, from one pass over its spec's fields.

A job's content id hashes ``json.dumps(spec minus job_id, sort_keys=True)`` (``spec_fingerprint``)
and its message carries ``json.dumps(spec without None values, job_id set)`` in field order (what
``publish_job`` sends). Both come from one ``model_dump`` of the spec (not one a text), with
encoders built once (``json.dumps`` with options builds one a call), and the kwargs are left open
so the job id, known only after the fingerprint, is appended without encoding them again: byte for
byte what the two ``json.dumps`` calls give (tests/unit/test_bulk_parts.py compares them).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as json_string  # json.dumps of a str
from typing import Any

from pydantic import BaseModel

_PLAIN = json.JSONEncoder(check_circular=False)
_SORTED = json.JSONEncoder(sort_keys=True, check_circular=False)


def spec_values(spec: BaseModel) -> tuple[dict[str, Any], bool]:
    """``spec.model_dump(mode="json")``, and whether it holds nothing nested but an empty list: for
    a spec of plain values (no output location, no LoRA) the model's own field dict as it is (same
    keys, same order, no copy), else the dump."""
    values: dict[str, Any] = spec.__dict__
    if values.get("output") is None and not values.get("loras"):
        return values, True
    return spec.model_dump(mode="json"), False


def spec_texts(body: dict[str, Any], plain: bool = False) -> tuple[str, str]:
    """(the text ``spec_fingerprint`` hashes, the task kwargs) of a ``model_dump(mode="json")``;
    ``plain``: it holds no nested None (``spec_values`` says).

    The kwargs leave out None values (nested ones too) and are left open (no closing brace) for
    ``close_kwargs`` to add the job id when the spec names none."""
    hashed = dict(body)
    hashed.pop("job_id", None)
    if plain:
        kwargs = {name: value for name, value in body.items() if value is not None}
    else:
        kwargs = without_none(body)
    return _SORTED.encode(hashed), _PLAIN.encode(kwargs)[:-1]


def close_kwargs(kwargs_open: str, job_id: str, own_id: bool) -> str:
    """The task kwargs as JSON: a spec's own job id is in place already, another one goes last."""
    return kwargs_open + ("}" if own_id else ', "job_id": ' + json_string(job_id) + "}")


def without_none(value: Any) -> Any:
    """A dump without its None values, nested ones too (``model_dump(exclude_none=True)``)."""
    if isinstance(value, dict):
        return {key: without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_none(item) for item in value]
    return value
