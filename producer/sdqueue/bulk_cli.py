"""``sdqueue bulk``: read the file, validate, run with a rich progress bar on stderr, report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

from sdqueue.bulk import BulkOptions, BulkRun, BulkSummary, prepare, presigner, write_report
from sdqueue.bulk_input import guess_format, read_rows

EXIT_INVALID = 2


def _lines(path: str) -> Iterator[str]:
    if path == "-":
        yield from sys.stdin
        return
    with open(path, encoding="utf-8-sig", newline="") as stream:
        yield from stream


class RichProgress:
    """A progress bar on stderr: finished/total, outcome counts, jobs in flight, rate, ETA."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("bulk"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.progress = Progress(*columns, console=Console(stderr=True), transient=False)
        self.task = self.progress.add_task("bulk", total=total, counts="")

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, summary: BulkSummary, in_flight: int) -> None:
        done = summary.succeeded + summary.failed + summary.cancelled
        counts = (
            f"ok {summary.succeeded}  failed {summary.failed}  cancelled {summary.cancelled}  "
            f"in flight {in_flight}  {summary.images_per_s:.2f} img/s"
        )
        self.progress.update(self.task, completed=done, counts=counts)


def _load(args: argparse.Namespace, queue: Any) -> tuple[list[Any], list[str]]:
    fmt = args.format or guess_format(args.file)
    try:
        rows = read_rows(_lines(args.file), fmt, args.mode)
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"{args.file}: {exc}"]
    jobs, errors = prepare(queue, rows)
    if not jobs and not errors:
        errors.append(f"{args.file}: no jobs in the file")
    return jobs, errors


def _human(summary: BulkSummary) -> str:
    return (
        f"{summary.total} jobs: {summary.succeeded} succeeded ({summary.resumed} from an earlier run), "
        f"{summary.failed} failed, {summary.cancelled} cancelled, {summary.unfinished} unfinished, "
        f"{summary.not_submitted} not submitted; {summary.images} images in {summary.elapsed_s:.1f}s "
        f"({summary.images_per_s:.2f} images/s); enqueued {summary.enqueued} "
        f"({summary.enqueue_jobs_per_s:.0f} jobs/s)"
    )


def run_bulk_command(args: argparse.Namespace, queue: Any) -> int:
    """The bulk subcommand; returns the exit code."""
    jobs, errors = _load(args, queue)
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        print(f"{len(errors)} invalid line(s); nothing submitted", file=sys.stderr)
        return EXIT_INVALID
    if args.dry_run:
        for job in jobs:
            print(json.dumps({"line": job.line, "job_id": job.job_id, "mode": job.spec.mode}))
        print(f"{len(jobs)} valid job(s); nothing submitted (dry run)", file=sys.stderr)
        return 0
    options = BulkOptions(
        lane=args.lane,
        max_in_flight=max(1, args.max_in_flight),
        timeout_s=args.timeout,
        poll_s=args.poll_s,
        retry_failed=args.retry_failed,
        sent_events=args.sent_events,
    )
    display = None if args.silent else RichProgress(len(jobs))
    with display or nullcontext():
        summary = BulkRun(queue, jobs, options, display).run()
    if args.report:
        write_report(args.report, jobs, presigner(queue) if args.presign else None)
    print(_human(summary), file=sys.stderr)
    print(json.dumps(summary.as_dict()))
    return summary.exit_code
