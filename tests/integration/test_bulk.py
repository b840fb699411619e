"""``sdqueue bulk`` and ``sdqueue download`` through the real CLI: resume by content across an edited
file, duplicates, the results index (JSONL, CSV, partial after kill -9), downloads, bad lines,
backpressure on the real lane depth (two runs side by side), local img2img inputs, cancel, and the
enqueue rate against a real redis-server."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from devstack.services import MotoServer
from sdqueue.bulk import CHUNK, BulkJob, BulkOptions, BulkRun, Preparer
from sdqueue.bulk_input import Row
from sdqueue.bulk_report import read_report
from sdqueue.client import SdQueue
from sdqueue.names import BULK_QUEUE, job_claim_key
from tests.helpers import ROOT, own_stack, png_bytes, sdqueue, smooth_image

SMALL = {"mode": "txt2img", "width": 64, "height": 64, "steps": 2}


def write_jsonl(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def report_of(path: Path) -> list[dict[str, Any]]:
    """A report's records in input order (the file itself is in the order lines settled)."""
    return sorted(read_report(str(path)), key=lambda record: int(record["line"]))


def summary_of(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def result_meta(queue: SdQueue, job_id: str) -> dict[str, Any]:
    return json.loads(queue.redis.get(f"celery-task-meta-{job_id}"))


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s")


class QueueDepth:
    """Samples the bulk queue's length in Redis while a run goes on (an independent view)."""

    def __init__(self, queue: SdQueue) -> None:
        self.queue = queue
        self.samples: list[int] = [0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append(int(self.queue.redis.llen(BULK_QUEUE)))
            time.sleep(0.01)

    def __enter__(self) -> QueueDepth:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.usefixtures("worker")
def test_an_edited_file_reruns_only_new_and_changed_lines_then_downloads(
    env: dict[str, str], queue: SdQueue, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    jobs = [{**SMALL, "prompt": f"bulk {tag} {i}", "num_images": 2 if i == 0 else 1} for i in range(6)]
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)
    with QueueDepth(queue) as depth:
        run = sdqueue(env, "bulk", str(path), "--max-in-flight", "3", "--report", str(tmp_path / "r1.jsonl"))
    assert run.returncode == 0, run.stderr
    summary = summary_of(run.stdout)
    print(
        f"bulk of 6: {summary['images']} images in {summary['elapsed_s']}s; queue depth <= {max(depth.samples)}"
    )
    assert (summary["succeeded"], summary["images"], summary["enqueued"]) == (6, 7, 6)
    assert max(depth.samples) <= 3
    first = report_of(tmp_path / "r1.jsonl")
    assert [r["line"] for r in first] == [1, 2, 3, 4, 5, 6] and {r["state"] for r in first} == {"succeeded"}
    assert len(first[0]["images"]) == len(first[0]["seeds"]) == 2 and first[0]["prompt"] == jobs[0]["prompt"]
    ids = {r["prompt"]: r["job_id"] for r in first}
    done_at = {job_id: result_meta(queue, job_id)["date_done"] for job_id in ids.values()}

    # Insert a line at the top, change line 3, delete line 5, move line 6 up, repeat line 1 at the end.
    edited = [
        {**SMALL, "prompt": f"bulk {tag} new"},
        jobs[0],
        jobs[1],
        {**jobs[2], "steps": 3},
        jobs[5],
        jobs[3],
    ]
    edited.append(jobs[0])
    write_jsonl(path, edited)
    again = sdqueue(env, "bulk", str(path), "--report", str(tmp_path / "r2.jsonl"), "--silent")
    assert again.returncode == 0, again.stderr
    summary = summary_of(again.stdout)
    assert (summary["enqueued"], summary["resumed"], summary["duplicate"], summary["total"]) == (2, 4, 1, 7)
    second = report_of(tmp_path / "r2.jsonl")
    assert second[-1] == {
        "line": 7,
        "state": "duplicate",
        "job_id": ids[jobs[0]["prompt"]],
        "duplicate_of": 2,
    }
    unchanged = [r for r in second if r.get("resumed")]
    assert {r["job_id"] for r in unchanged} == {ids[jobs[i]["prompt"]] for i in (0, 1, 3, 5)}
    assert second[3]["job_id"] != ids[jobs[2]["prompt"]] and not second[3].get("resumed")
    rerun_done_at = {job_id: result_meta(queue, job_id)["date_done"] for job_id in done_at}
    assert rerun_done_at == done_at, "the rerun ran unchanged jobs again"

    out = tmp_path / "images"
    fetched = sdqueue(env, "download", str(tmp_path / "r2.jsonl"), str(out), "--silent")
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout) == {"downloaded": 7, "skipped": 0, "failed": 0}
    names = sorted(p.name for p in out.iterdir())
    assert f"{ids[jobs[0]['prompt']]}_1.png" in names and len(names) == 7
    (out / names[0]).unlink()
    resumed = sdqueue(env, "download", str(tmp_path / "r2.jsonl"), str(out), "--silent")
    assert json.loads(resumed.stdout) == {"downloaded": 1, "skipped": 6, "failed": 0}


@pytest.mark.usefixtures("worker")
def test_csv_from_stdin_typed_by_the_contract_with_a_csv_report_and_each_duplicate(
    env: dict[str, str], queue: SdQueue, s3: Any, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    csv_text = (
        "prompt,steps,guidance_scale,seed,width,height,output.bucket,output.prefix\n"
        f"csv {tag} a,2,6.5,41,64,64,sdqueue,bulkcsv\n"
        f'"csv {tag}, quoted",3,,,64,72,,\n'
        f'"csv {tag}, quoted",3,,,64,72,,\n'
    )
    report, out = tmp_path / "index.csv", tmp_path / "images"
    options = ["--format", "csv", "--mode", "txt2img", "--duplicates", "each", "--report", str(report)]
    run = sdqueue(env, "bulk", "-", *options, "--download", str(out), stdin=csv_text)
    assert run.returncode == 0, run.stderr
    assert '{"downloaded": 3, "skipped": 0, "failed": 0}' in run.stderr
    with report.open() as stream:
        rows = sorted(csv.DictReader(stream), key=lambda row: int(row["line"]))
    assert [row["line"] for row in rows] == ["2", "3", "4"] and rows[0]["seeds"] == "41"
    assert rows[2]["duplicate_of"] == "3" and rows[2]["job_id"] != rows[1]["job_id"]
    bucket, key = rows[0]["images"].removeprefix("s3://").split("/", 1)
    assert key.startswith("outputs/bulkcsv/"), key
    manifest = json.loads(
        s3.get_object(Bucket=bucket, Key=key.rsplit("/", 1)[0] + "/manifest.json")["Body"].read()
    )
    assert (
        manifest["spec"]["steps"] == 2
        and manifest["spec"]["guidance_scale"] == 6.5
        and manifest["seeds"] == [41]
    )
    assert result_meta(queue, rows[1]["job_id"])["result"]["images"][0]["height"] == 72
    assert rows[1]["seeds"] != rows[2]["seeds"], "each copy of a seedless line gets its own seed"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{row['job_id']}_0.png" for row in rows)


@pytest.mark.usefixtures("worker")
def test_no_wait_enqueues_and_a_second_run_collects_without_resubmitting(
    env: dict[str, str], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    path = write_jsonl(tmp_path / "jobs.jsonl", [{**SMALL, "prompt": f"later {tag} {i}"} for i in range(2)])
    queued = sdqueue(env, "bulk", str(path), "--no-wait", "--silent")
    assert queued.returncode == 0, queued.stderr
    assert (summary_of(queued.stdout)["queued"], summary_of(queued.stdout)["enqueued"]) == (2, 2)
    collected = sdqueue(env, "bulk", str(path), "--silent")
    assert collected.returncode == 0, collected.stderr
    summary = summary_of(collected.stdout)
    assert (summary["succeeded"], summary["enqueued"]) == (2, 0), "followed or read back, never resubmitted"


@pytest.mark.usefixtures("worker")
def test_a_failed_job_exits_1_with_its_error_and_retry_failed_reruns_it(
    env: dict[str, str], s3: Any, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    missing = f"bulk/{tag}.png"
    img2img = {"mode": "img2img", "prompt": "x", "image_url": f"s3://inputs/{missing}", "strength": 0.5}
    jobs = [{**SMALL, "prompt": f"ok {tag}"}, {**SMALL, **img2img, "steps": 4}]
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)
    run = sdqueue(env, "bulk", str(path), "--report", str(tmp_path / "r.jsonl"))
    assert run.returncode == 1, run.stderr
    assert (summary_of(run.stdout)["succeeded"], summary_of(run.stdout)["failed"]) == (1, 1)
    failed = report_of(tmp_path / "r.jsonl")[1]
    assert failed["state"] == "failed" and "no such object" in failed["error"]
    assert "line 2: " in run.stderr, "the first errors are shown as they arrive"

    s3.put_object(Bucket="inputs", Key=missing, Body=png_bytes(smooth_image(3)))
    same = sdqueue(env, "bulk", str(path), "--silent")
    assert same.returncode == 1, "without --retry-failed the failure stands"
    retried = sdqueue(env, "bulk", str(path), "--retry-failed", "--report", str(tmp_path / "r2.jsonl"))
    assert retried.returncode == 0, retried.stderr
    assert summary_of(retried.stdout)["enqueued"] == 1
    assert report_of(tmp_path / "r2.jsonl")[1]["state"] == "succeeded"


@pytest.mark.usefixtures("worker")
def test_bad_lines_are_named_and_the_good_ones_still_run_unless_strict(
    env: dict[str, str], queue: SdQueue, tmp_path: Path
) -> None:
    job_id = f"good-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "bad.jsonl"
    good = json.dumps({**SMALL, "prompt": "fine", "job_id": job_id})
    path.write_text(good + "\n\n" + json.dumps({**SMALL, "prompt": "x", "steps": 0}) + "\n{nope\n")
    for extra in (["--strict"], ["--dry-run"]):
        run = sdqueue(env, "bulk", str(path), *extra)
        assert run.returncode == 2
        assert "line 3: invalid job: steps" in run.stderr and "line 4: not valid JSON" in run.stderr
        assert not queue.redis.exists(job_claim_key(job_id)), "nothing is submitted"
    run = sdqueue(env, "bulk", str(path), "--report", str(tmp_path / "r.jsonl"), "--silent")
    assert run.returncode == 2, run.stderr
    assert "line 3: invalid job: steps" in run.stderr
    states = [(r["line"], r["state"]) for r in report_of(tmp_path / "r.jsonl")]
    assert states == [(1, "succeeded"), (3, "invalid"), (4, "invalid")]
    path.write_text(json.dumps({**SMALL, "prompt": "edited", "job_id": job_id}) + "\n")
    edited = sdqueue(env, "bulk", str(path), "--report", str(tmp_path / "r2.jsonl"), "--silent")
    assert edited.returncode == 1, edited.stderr
    (record,) = report_of(tmp_path / "r2.jsonl")
    assert record["state"] == "failed" and "JobIdConflict" in record["error"], "not the old job's images"


def test_backpressure_reads_the_lane_depth_shared_by_two_runs_and_the_index_survives_kill(
    logdir: Path, moto: MotoServer, tiny_model: str, tmp_path: Path
) -> None:
    with own_stack(logdir, moto.url, tiny_model, "bulk-noworker", with_worker=False) as stack:
        paths = [
            write_jsonl(tmp_path / f"jobs{n}.jsonl", [{**SMALL, "prompt": f"run{n} p{i}"} for i in range(12)])
            for n in (1, 2)
        ]
        argv = [
            sys.executable,
            "-m",
            "sdqueue.cli",
            "bulk",
            "--max-in-flight",
            "5",
            "--timeout",
            "3",
            "--silent",
        ]
        runs = [
            subprocess.Popen(
                [*argv, str(p), "--report", str(p) + ".report"],
                env=stack.env,
                cwd=ROOT,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for p in paths
        ]
        outputs = [run.communicate(timeout=120) for run in runs]
        queued = stack.queue.redis.llen(BULK_QUEUE)
        summaries = [summary_of(out) for out, _ in outputs]
        print(
            f"two runs, cap 5 each, no worker: {queued} messages queued, {[s['enqueued'] for s in summaries]}"
        )
        assert [run.returncode for run in runs] == [1, 1]
        assert queued == 5, "together the two runs never pushed the lane past the cap"
        assert sum(s["enqueued"] for s in summaries) == 5 and sum(s["not_submitted"] for s in summaries) == 19
        states = [r["state"] for r in report_of(Path(str(paths[0]) + ".report"))]
        assert len(states) == 12 and set(states) <= {"unfinished", "not_submitted"}

        stack.queue.redis.delete(BULK_QUEUE)
        lines = [json.dumps({**SMALL, "prompt": "x", "steps": 0})] * 3 + [
            json.dumps({**SMALL, "prompt": "k"})
        ]
        (tmp_path / "kill.jsonl").write_text("\n".join(lines) + "\n")
        report = tmp_path / "kill.report"
        killed = subprocess.Popen(
            [*argv[:-3], str(tmp_path / "kill.jsonl"), "--report", str(report), "--silent"],
            env=stack.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: report.exists() and len(report.read_text().splitlines()) >= 3, 60, "3 records")
        finally:
            os.kill(killed.pid, signal.SIGKILL)
            killed.wait()
        partial = report_of(report)
        assert [(r["line"], r["state"]) for r in partial] == [(1, "invalid"), (2, "invalid"), (3, "invalid")]


@pytest.mark.usefixtures("worker")
def test_img2img_local_files_are_uploaded_once_by_content(
    env: dict[str, str], queue: SdQueue, s3: Any, tmp_path: Path
) -> None:
    picture = png_bytes(smooth_image(int(uuid.uuid4().int % 1000)))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(picture)
    shutil.copy(tmp_path / "in" / "a.png", tmp_path / "in" / "same-bytes.png")
    base = {**SMALL, "mode": "img2img", "strength": 0.5, "steps": 4}
    jobs = [
        {**base, "prompt": "one", "image_url": "in/a.png"},
        {**base, "prompt": "two", "image_url": "in/same-bytes.png"},
        {**base, "prompt": "three", "image_url": "in/missing.png"},
    ]
    before = s3.list_objects_v2(Bucket="sdqueue", Prefix="bulk-inputs/").get("KeyCount", 0)
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)
    run = sdqueue(env, "bulk", str(path), "--report", str(tmp_path / "r.jsonl"), "--silent")
    assert run.returncode == 2, run.stderr
    records = report_of(tmp_path / "r.jsonl")
    assert [r["state"] for r in records] == ["succeeded", "succeeded", "invalid"]
    assert "line 3: " in records[2]["error"] and "missing.png" in records[2]["error"]
    listing = s3.list_objects_v2(Bucket="sdqueue", Prefix="bulk-inputs/")
    assert listing["KeyCount"] - before <= 1, "the same bytes are one object"
    spec = result_meta(queue, records[0]["job_id"])["kwargs"]
    assert spec["image_url"].startswith("s3://sdqueue/bulk-inputs/") and spec["image_url"].endswith(".png")
    assert spec["image_url"] == result_meta(queue, records[1]["job_id"])["kwargs"]["image_url"]


@pytest.mark.usefixtures("worker")
def test_a_cancelled_job_is_counted_as_cancelled(env: dict[str, str], queue: SdQueue, tmp_path: Path) -> None:
    long_id = f"bulk-cancel-{uuid.uuid4().hex[:8]}"
    jobs = [{**SMALL, "prompt": "long", "steps": 150, "job_id": long_id}, {**SMALL, "prompt": "short"}]
    path = write_jsonl(tmp_path / "jobs.jsonl", jobs)

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not queue.handle(long_id).progress():
            time.sleep(0.05)
        queue.handle(long_id).cancel()

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    run = sdqueue(env, "bulk", str(path), "--report", str(tmp_path / "r.jsonl"))
    canceller.join()
    assert run.returncode == 1, run.stderr
    summary = summary_of(run.stdout)
    assert (summary["cancelled"], summary["succeeded"]) == (1, 1)
    assert report_of(tmp_path / "r.jsonl")[0]["state"] == "cancelled"


def test_bulk_enqueue_rate_against_a_real_redis(logdir: Path, moto: MotoServer, tiny_model: str) -> None:
    """The script push path on 5,000 jobs; prints jobs/s (100,000 jobs: benchmarks/bulk_enqueue.py)."""
    with own_stack(logdir, moto.url, tiny_model, "bulk-rate", with_worker=False) as stack:
        count = 5000
        preparer = Preparer(stack.queue, run_name=uuid.uuid4().hex)
        rows = (Row(i + 1, {**SMALL, "prompt": f"rate {i}"}) for i in range(count))
        jobs = [item for item in preparer(rows) if isinstance(item, BulkJob)]
        run = BulkRun(stack.queue, [], preparer, BulkOptions())
        began = time.perf_counter()
        for start in range(0, count, CHUNK):
            assert all(result.pushed for result in run.submitter.push(jobs[start : start + CHUNK], 0))
        rate = count / (time.perf_counter() - began)
        print(f"bulk enqueue: {rate:.0f} jobs/s ({count} jobs: claim + message, one script call per {CHUNK})")
        assert stack.queue.redis.llen(BULK_QUEUE) == count
        message = json.loads(stack.queue.redis.lindex(BULK_QUEUE, -1))
        assert message["headers"]["task"] == "sdqueue.txt2img" and message["headers"]["id"] == jobs[0].job_id
        assert stack.queue.redis.exists(job_claim_key(jobs[-1].job_id))
        assert rate > 1000, "far below the ~8,000+ jobs/s measured on a loaded 2-core machine"
