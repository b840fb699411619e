"""``sdqueue cleanup --older-than 30d``: delete old job folders, for stores without a lifecycle rule.

A job folder is ``<bucket>/<prefix>/<job_id>/`` (images and ``manifest.json``). A folder is old
when its manifest's LastModified is older than the cutoff; folders without a manifest (a job
still running, or one that failed before writing it) are never deleted. Dry run unless ``yes``:
the plan is printed and nothing is deleted. A bucket lifecycle rule (docs/deploy.md) does the
same work inside the store and is preferred where the store supports it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sdqueue.errors import JobValidationError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``2w``, ``90m`` or ``45s`` -> a timedelta (a positive one)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text.lower())
    if not match or int(match.group(1)) <= 0:
        raise JobValidationError(
            f"--older-than {text!r}: give a positive number and a unit s, m, h, d or w (30d)"
        )
    return timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])


@dataclass
class CleanupPlan:
    """What a cleanup found: old folders (with their keys and manifest time) and what it kept."""

    old: dict[str, list[str]] = field(default_factory=dict)
    manifest_time: dict[str, datetime] = field(default_factory=dict)
    kept_recent: int = 0
    kept_without_manifest: int = 0

    @property
    def object_count(self) -> int:
        return sum(len(keys) for keys in self.old.values())


def plan_cleanup(
    client: Any, bucket: str, prefix: str, older_than: timedelta, now: datetime | None = None
) -> CleanupPlan:
    """List ``bucket/prefix/`` and group its objects into job folders; pick those to delete."""
    cutoff = (now or datetime.now(timezone.utc)) - older_than
    root = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    folders: dict[str, list[str]] = defaultdict(list)
    manifests: dict[str, datetime] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root):
        for item in page.get("Contents", []):
            rest = item["Key"][len(root) :]
            if "/" not in rest:
                continue  # an object directly under the prefix: no job folder
            folder = root + rest.split("/", 1)[0]
            folders[folder].append(item["Key"])
            if rest.split("/", 1)[1] == "manifest.json":
                manifests[folder] = item["LastModified"]
    plan = CleanupPlan()
    for folder, keys in sorted(folders.items()):
        if folder not in manifests:
            plan.kept_without_manifest += 1
        elif manifests[folder] < cutoff:
            plan.old[folder] = keys
            plan.manifest_time[folder] = manifests[folder]
        else:
            plan.kept_recent += 1
    return plan


def delete_folders(client: Any, bucket: str, plan: CleanupPlan) -> int:
    """Delete every object of the plan's old folders; returns how many were deleted."""
    keys = [key for folder in plan.old.values() for key in folder]
    deleted = 0
    for start in range(0, len(keys), DELETE_BATCH):
        batch = keys[start : start + DELETE_BATCH]
        answer = client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
        )
        errors = answer.get("Errors", [])
        if errors:
            first = errors[0]
            raise RuntimeError(
                f"{len(errors)} objects not deleted, e.g. {first.get('Key')}: {first.get('Message')}"
            )
        deleted += len(batch)
    return deleted
