"""``sdqueue cleanup`` against moto's S3 server: a dry run deletes nothing, ``--yes`` deletes the job
folders whose manifest is older than the cutoff and keeps recent ones and those without a manifest."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from sdqueue.cleanup import parse_age
from sdqueue.errors import JobValidationError
from tests.helpers import sdqueue

GAP_S = 10


def put_folder(s3: Any, prefix: str, job_id: str, manifest: bool = True) -> None:
    s3.put_object(Bucket="sdqueue", Key=f"{prefix}/{job_id}/0.png", Body=b"png")
    if manifest:
        s3.put_object(Bucket="sdqueue", Key=f"{prefix}/{job_id}/manifest.json", Body=b"{}")


def keys(s3: Any, prefix: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket="sdqueue", Prefix=f"{prefix}/").get("Contents", [])}


def test_cleanup_deletes_only_old_folders_with_a_manifest_and_only_with_yes(
    s3: Any, env: dict[str, str]
) -> None:
    prefix = f"cleanup-{uuid.uuid4().hex[:6]}"
    put_folder(s3, prefix, "old")
    put_folder(s3, prefix, "unfinished", manifest=False)
    old_at = time.time()
    time.sleep(GAP_S)
    put_folder(s3, prefix, "recent")
    s3.put_object(Bucket="sdqueue", Key=f"{prefix}/loose.txt", Body=b"not a job folder")
    before = keys(s3, prefix)
    # the cutoff falls between the two: GAP_S / 2 of slack for the CLI's start-up
    args = ("cleanup", "--older-than", f"{int(time.time() - old_at - GAP_S / 2)}s", "--prefix", prefix)

    dry = sdqueue(env, *args)
    assert dry.returncode == 0, dry.stderr
    assert f"would delete s3://sdqueue/{prefix}/old/" in dry.stdout and "recent" not in dry.stdout
    summary = json.loads(dry.stderr)
    assert summary["dry_run"] and summary["objects_to_delete"] == 2 and summary["objects_deleted"] == 0
    assert summary["kept_recent"] == 1 and summary["kept_without_manifest"] == 1
    assert keys(s3, prefix) == before, "a dry run deletes nothing"

    done = sdqueue(env, *args[:2], f"{int(time.time() - old_at - GAP_S / 2)}s", *args[3:], "--yes")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr)["objects_deleted"] == 2
    assert keys(s3, prefix) == before - {f"{prefix}/old/0.png", f"{prefix}/old/manifest.json"}


def test_ages_are_parsed_or_refused() -> None:
    assert parse_age("30d").days == 30 and parse_age("12h").total_seconds() == 43200
    for bad in ("30", "0d", "-1d", "3y", ""):
        with pytest.raises(JobValidationError):
            parse_age(bad)


def test_the_documented_lifecycle_rule_is_accepted_by_s3(s3: Any) -> None:
    from tests.helpers import ROOT

    rule = json.loads((ROOT / "docs" / "s3-lifecycle.json").read_text())
    s3.create_bucket(Bucket="lifecycle-check")
    s3.put_bucket_lifecycle_configuration(Bucket="lifecycle-check", LifecycleConfiguration=rule)
    stored = s3.get_bucket_lifecycle_configuration(Bucket="lifecycle-check")["Rules"]
    assert stored[0]["Expiration"] == {"Days": 30} and stored[0]["Filter"] == {"Prefix": "outputs/"}
