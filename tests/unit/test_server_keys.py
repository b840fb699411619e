"""API key entries of ``sdqueue serve``: only hashes are configured; malformed entries are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdqueue.server.keys import KeyConfigError, hash_key, load_keys, new_key_line, parse_entry


def test_a_new_key_is_admitted_by_its_own_entry_only() -> None:
    key, line = new_key_line("alice", "bulk")
    keys = load_keys(line, None)
    assert keys[hash_key(key)].name == "alice" and keys[hash_key(key)].lane == "bulk"
    assert key not in line and hash_key("another") not in keys


def test_a_key_file_may_set_per_key_limits(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "bob", "sha256": hash_key("k"), "max_concurrent": 3}]))
    assert load_keys(None, str(path))[hash_key("k")].max_concurrent == 3
    lines = tmp_path / "keys.txt"
    lines.write_text(f"# tenants\ncarol:{hash_key('c')}\n")
    assert load_keys(None, str(lines))[hash_key("c")].name == "carol"


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("Alice:" + "0" * 64, "lowercase"),
        ("anon:" + "0" * 64, "not 'anon'"),
        ("alice:abc", "64 lowercase hex"),
        ("alice:" + "0" * 64 + ":fast", "lane must be"),
        ("alice", "expected name:sha256hex"),
    ],
)
def test_malformed_entries_say_what_to_fix(entry: str, words: str) -> None:
    with pytest.raises(KeyConfigError, match=words):
        parse_entry(entry)


def test_a_tenant_name_appears_once() -> None:
    with pytest.raises(KeyConfigError, match="once"):
        load_keys(f"alice:{hash_key('a')},alice:{hash_key('b')}", None)
