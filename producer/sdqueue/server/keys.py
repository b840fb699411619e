"""API keys: only their sha256 is configured; each names a tenant, optionally bound to a lane."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdqueue.errors import SdqError

TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
LANES = ("interactive", "bulk")
ANONYMOUS = "anon"


class KeyConfigError(SdqError):
    """An API key entry in the settings or the key file is malformed."""


@dataclass(frozen=True)
class ApiKey:
    """One tenant's key: its name, the lane it is bound to, and its limits (None: the defaults)."""

    name: str
    sha256: str
    lane: str | None = None
    rate_per_minute: int | None = None
    max_concurrent: int | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key_line(name: str, lane: str | None = None) -> tuple[str, str]:
    """A fresh random key and the ``name:sha256[:lane]`` entry that admits it."""
    _check(ApiKey(name, "0" * 64, lane))
    key = "sdq_" + secrets.token_urlsafe(32)
    return key, ":".join([name, hash_key(key), *([lane] if lane else [])])


def _check(key: ApiKey) -> ApiKey:
    if not TENANT_PATTERN.fullmatch(key.name) or key.name == ANONYMOUS:
        raise KeyConfigError(
            f"API key name {key.name!r}: use 1-32 lowercase letters, digits or '-', not 'anon'"
        )
    if not HEX64.fullmatch(key.sha256):
        raise KeyConfigError(f"API key {key.name!r}: sha256 must be 64 lowercase hex digits")
    if key.lane not in (None, *LANES):
        raise KeyConfigError(f"API key {key.name!r}: lane must be one of {', '.join(LANES)}")
    return key


def parse_entry(entry: str) -> ApiKey:
    """``name:sha256hex[:lane]``."""
    parts = entry.strip().split(":")
    if len(parts) not in (2, 3):
        raise KeyConfigError(f"API key entry {entry.split(':')[0]!r}...: expected name:sha256hex[:lane]")
    return _check(ApiKey(parts[0], parts[1].lower(), parts[2] if len(parts) == 3 else None))


def _from_object(body: dict[str, Any]) -> ApiKey:
    known = {"name", "sha256", "lane", "rate_per_minute", "max_concurrent"}
    if not isinstance(body, dict) or set(body) - known or not {"name", "sha256"} <= set(body):
        raise KeyConfigError(f"API key file: each entry needs name and sha256, and only {sorted(known)}")
    return _check(ApiKey(**body))


def load_keys(entries: str | None, path: str | None) -> dict[str, ApiKey]:
    """All configured keys by their sha256; names must be unique (a name is a tenant)."""
    keys = [parse_entry(e) for e in (entries or "").split(",") if e.strip()]
    if path:
        text = Path(path).read_text()
        if text.lstrip().startswith("["):
            keys += [_from_object(body) for body in json.loads(text)]
        else:
            keys += [
                parse_entry(line) for line in text.splitlines() if line.strip() and not line.startswith("#")
            ]
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise KeyConfigError("API keys: each name (tenant) may appear once")
    return {k.sha256: k for k in keys}
