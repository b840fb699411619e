"""Stable job ids for bulk lines, and a compact table of the ids a run has already seen.

A line's job id is its own ``job_id`` when it has one, else a hash of its normalised spec (every
field, defaults filled in, so ``"steps": 30`` and a missing ``steps`` are the same job) and the
run name. The line number is not part of it: inserting, deleting or reordering lines leaves the
other lines' ids alone, and editing a line changes only that line's id.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

ID_PREFIX = "bulk-"


def content_job_id(fingerprint: str, run_name: str = "", occurrence: int = 1) -> str:
    """The id of a spec without its own job_id; ``occurrence`` > 1 numbers repeated lines."""
    text = f"{run_name}\x00{fingerprint}" + (f"\x00{occurrence}" if occurrence > 1 else "")
    return ID_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:32]


def _key(text: str) -> int:
    """A non-zero 64-bit key (0 marks an empty slot); collisions at 10^6 ids: about 1 in 10^7."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") or 1


@dataclass(frozen=True)
class Seen:
    """What the table knew of an id before this line: where it first appeared, how often, with
    which spec (a 32-bit tag of the fingerprint)."""

    first_line: int
    count: int
    tag: int


class SeenTable:
    """id -> (first line, count, fingerprint tag) in flat arrays: 24 bytes a slot, about 48 bytes
    an id, where a Python dict of the same would take several hundred."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._keys = array("Q", bytes(8 * capacity))
        self._lines = array("I", bytes(4 * capacity))
        self._counts = array("I", bytes(4 * capacity))
        self._tags = array("I", bytes(4 * capacity))
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def _slot(self, key: int) -> int:
        mask = len(self._keys) - 1
        slot = key & mask
        while self._keys[slot] not in (0, key):
            slot = (slot + 1) & mask
        return slot

    def add(self, job_id: str, line: int, fingerprint: str) -> Seen | None:
        """Count one more line with this id; returns what was known before, or None if it is new."""
        key = _key(job_id)
        slot = self._slot(key)
        if self._keys[slot] == key:
            seen = Seen(self._lines[slot], self._counts[slot], self._tags[slot])
            self._counts[slot] += 1
            return seen
        if 2 * (self._size + 1) > len(self._keys):
            self._grow()
            slot = self._slot(key)
        self._keys[slot], self._lines[slot], self._counts[slot] = key, line, 1
        self._tags[slot] = fingerprint_tag(fingerprint)
        self._size += 1
        return None

    def _grow(self) -> None:
        old = (self._keys, self._lines, self._counts, self._tags)
        self.__init__(2 * len(self._keys))  # type: ignore[misc]
        for key, line, count, tag in zip(*old, strict=True):
            if key:
                slot = self._slot(key)
                self._keys[slot], self._lines[slot], self._counts[slot], self._tags[slot] = (
                    key,
                    line,
                    count,
                    tag,
                )
                self._size += 1


def fingerprint_tag(fingerprint: str) -> int:
    """32 bits of a spec fingerprint (a hex string), enough to tell two specs of one id apart."""
    return int(fingerprint[:8], 16)
