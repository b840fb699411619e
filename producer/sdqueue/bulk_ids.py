"""Stable job ids for bulk lines, and a compact table of the ids a run has already seen.

A line's job id is its own ``job_id`` when it has one, else a hash of its normalised spec (every
field, defaults filled in, so ``"steps": 30`` and a missing ``steps`` are the same job) and the
run name. The line number is not part of it: inserting, deleting or reordering lines leaves the
other lines' ids alone, and editing a line changes only that line's id.

The ids seen so far (to report repeated lines) live in flat arrays up to ``MEMORY_IDS`` distinct
ids (262,144: about 12 MB), then move to an SQLite file in a temporary folder with a bounded page cache, so
memory stays flat however long the file is.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MEMORY_IDS = 1 << 18
DISK_CACHE_KIB = 8 * 1024

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

    def items(self) -> Iterator[tuple[int, int, int, int]]:
        """Every (key, first line, count, tag)."""
        columns = zip(self._keys, self._lines, self._counts, self._tags, strict=True)
        return (entry for entry in columns if entry[0])

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


class SeenOnDisk:
    """The same table as SQLite rows, for files with more distinct ids than fit ``MEMORY_IDS``."""

    UPSERT = (
        "INSERT INTO seen VALUES (?, ?, 1, ?) ON CONFLICT(key) DO UPDATE SET count = count + 1 "
        "RETURNING line, count, tag"
    )

    def __init__(self, entries: Iterable[tuple[int, int, int, int]]) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="sdq-bulk-ids-")
        self.db = sqlite3.connect(os.path.join(self.folder.name, "seen.db"), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{DISK_CACHE_KIB}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute(
            "CREATE TABLE seen (key INTEGER PRIMARY KEY, line INTEGER, count INTEGER, tag INTEGER)"
        )
        rows = ((_signed(key), line, count, tag) for key, line, count, tag in entries)
        self.db.executemany("INSERT INTO seen VALUES (?, ?, ?, ?)", rows)

    def add(self, job_id: str, line: int, fingerprint: str) -> Seen | None:
        first, count, tag = self.db.execute(
            self.UPSERT, (_signed(_key(job_id)), line, fingerprint_tag(fingerprint))
        ).fetchone()
        return None if count == 1 else Seen(first, count - 1, tag)

    def close(self) -> None:
        self.db.close()
        self.folder.cleanup()


class SeenIds:
    """The ids of a run's lines so far: in memory while small, on disk past ``memory_ids``."""

    def __init__(self, memory_ids: int = MEMORY_IDS) -> None:
        self.memory_ids = memory_ids
        self.store: SeenTable | SeenOnDisk = SeenTable()

    def add(self, job_id: str, line: int, fingerprint: str) -> Seen | None:
        """Count one more line with this id; returns what was known before, or None if it is new."""
        if isinstance(self.store, SeenTable) and len(self.store) >= self.memory_ids:
            self.store = SeenOnDisk(self.store.items())
        return self.store.add(job_id, line, fingerprint)

    def close(self) -> None:
        if isinstance(self.store, SeenOnDisk):
            self.store.close()


def _signed(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key
