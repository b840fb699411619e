"""``sdqueue bulk`` and ``sdqueue download``: stream the file, run with live progress, report, fetch."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sdqueue.bulk import BulkOptions, BulkRun, BulkSummary, LineNote, Preparer, presigner
from sdqueue.bulk_input import Row, count_lines, guess_format, read_rows
from sdqueue.bulk_report import ReportWriter
from sdqueue.bulk_uploads import InputUploader

EXIT_INVALID = 2
SHOWN_ERRORS = 10


class Input:
    """The job file (stdin spooled to a temporary file when it must be read twice)."""

    def __init__(self, path: str, fmt: str | None, mode: str | None, spool: bool) -> None:
        self.format = fmt or guess_format(path)
        self.mode = mode
        self.path = path
        self._spooled: str | None = None
        if path != "-":
            open(path, "rb").close()  # a missing or unreadable file fails here, before any output
        elif spool:
            with tempfile.NamedTemporaryFile("w", delete=False, suffix=".sdq", encoding="utf-8") as out:
                shutil.copyfileobj(sys.stdin, out)
            self._spooled = self.path = out.name
        self.base = Path.cwd() if path == "-" else Path(path).resolve().parent

    def rows(self) -> Iterator[Row]:
        return read_rows(self._lines(), self.format, self.mode)

    def _lines(self) -> Iterator[str]:
        if self.path == "-":
            yield from sys.stdin
            return
        with open(self.path, encoding="utf-8-sig", newline="") as stream:
            yield from stream

    def total(self) -> int | None:
        """About how many job lines (for the ETA); None for stdin."""
        if self.path == "-":
            return None
        return max(0, count_lines(self.path) - (self.format == "csv"))

    def close(self) -> None:
        if self._spooled:
            os.unlink(self._spooled)


class ErrorLog:
    """Prints the first errors of a run; counts the rest (all of them are in the report)."""

    def __init__(self, console: Any = None) -> None:
        self.console = console
        self.seen = 0

    def error(self, text: str) -> None:
        self.seen += 1
        if self.seen <= SHOWN_ERRORS:
            self._print(text)
        elif self.seen == SHOWN_ERRORS + 1:
            self._print(f"... more errors (all in the --report); showing the first {SHOWN_ERRORS}")

    def _print(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False, style="red")
        else:
            print(text, file=sys.stderr)

    def update(self, summary: BulkSummary, in_flight: int) -> None:
        """Silent mode: no live progress."""

    def done(self, summary: BulkSummary) -> None:
        """Silent mode: the summary is printed by the caller."""


class RichProgress(ErrorLog):
    """A progress bar on stderr: settled/total, outcomes, in flight, images/s, ETA; errors above it."""

    def __init__(self, total: int | None) -> None:
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
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.progress = Progress(*columns, console=Console(stderr=True), transient=False)
        super().__init__(self.progress.console)
        self.task = self.progress.add_task("bulk", total=total, counts="")

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(self, summary: BulkSummary, in_flight: int) -> None:
        counts = (
            f"ok {summary.succeeded}  failed {summary.failed}  invalid {summary.invalid}  "
            f"in flight {in_flight}  {summary.images_per_s:.2f} img/s"
        )
        total = self.progress.tasks[0].total
        if total is not None and summary.total > total:
            self.progress.update(self.task, total=summary.total)
        self.progress.update(self.task, completed=summary.settled, counts=counts)

    def done(self, summary: BulkSummary) -> None:
        """The last update: the real line count is known now."""
        self.update(summary, 0)
        if not summary.interrupted:
            self.progress.update(self.task, total=summary.total)


def _human(summary: BulkSummary) -> str:
    return (
        f"{summary.total} lines: {summary.succeeded} succeeded ({summary.resumed} from an earlier run), "
        f"{summary.failed} failed, {summary.cancelled} cancelled, {summary.invalid} invalid, "
        f"{summary.duplicate} duplicate, {summary.unfinished} unfinished, {summary.not_submitted} not "
        f"submitted, {summary.queued} queued; {summary.images} images in {summary.elapsed_s:.1f}s "
        f"({summary.images_per_s:.2f} images/s); enqueued {summary.enqueued} "
        f"({summary.enqueue_jobs_per_s:.0f} jobs/s)"
    )


def _preparer(args: argparse.Namespace, queue: Any, source: Input, dry_run: bool) -> Preparer:
    bucket = args.upload_bucket or (queue.settings.input_buckets or [""])[0]
    uploader = InputUploader(
        lambda: queue.storage, bucket, source.base, queue.settings.max_input_bytes, dry_run
    )
    return Preparer(queue, args.run_name or "", args.duplicates, uploader)


def _dry_run(args: argparse.Namespace, queue: Any, source: Input, quiet: bool = False) -> int:
    """Validate every line; print each line's job id and the counts (unless ``quiet``: then only the
    errors); returns the number of invalid lines."""
    log, jobs, invalid, duplicate = ErrorLog(), 0, 0, 0
    for item in _preparer(args, queue, source, dry_run=True)(source.rows()):
        if isinstance(item, LineNote) and item.state == "invalid":
            invalid += 1
            log.error(item.error or "")
            continue
        jobs += not isinstance(item, LineNote)
        duplicate += isinstance(item, LineNote)
        if not quiet:
            print(json.dumps(item.record() if isinstance(item, LineNote) else _dry_record(item)))
    if not quiet:
        counts = f"{jobs} job(s) to run, {duplicate} duplicate line(s), {invalid} invalid line(s)"
        print(f"{counts}; nothing submitted", file=sys.stderr)
    return invalid


def _dry_record(job: Any) -> dict[str, Any]:
    body = {"line": job.line, "job_id": job.job_id, "mode": job.spec.mode}
    if job.duplicate_of:
        body["duplicate_of"] = job.duplicate_of
    return body


def _options(args: argparse.Namespace) -> BulkOptions:
    return BulkOptions(
        lane=args.lane,
        max_in_flight=max(1, args.max_in_flight),
        timeout_s=args.timeout,
        poll_s=args.poll_s,
        retry_failed=args.retry_failed,
        follow=not args.no_wait,
        sent_events=args.sent_events,
    )


def _run(args: argparse.Namespace, queue: Any, source: Input) -> tuple[BulkSummary, str | None]:
    report_path = args.report or (os.path.join(args.download, "report.jsonl") if args.download else None)
    if report_path and args.download:
        os.makedirs(args.download, exist_ok=True)
    with ExitStack() as stack:
        report = None
        if report_path:
            report = ReportWriter(report_path, args.report_format, presigner(queue) if args.presign else None)
            stack.callback(report.close)
        display = ErrorLog() if args.silent else stack.enter_context(RichProgress(source.total()))
        preparer = _preparer(args, queue, source, dry_run=False)
        summary = BulkRun(queue, source.rows(), preparer, _options(args), report, display).run()
    return summary, report_path


def run_bulk_command(args: argparse.Namespace, queue: Any) -> int:
    """The bulk subcommand; returns the exit code."""
    try:
        source = Input(args.file, args.format, args.mode, spool=args.strict)
    except OSError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        return _bulk(args, queue, source)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    finally:
        source.close()


def _bulk(args: argparse.Namespace, queue: Any, source: Input) -> int:
    if args.dry_run:
        return EXIT_INVALID if _dry_run(args, queue, source) else 0
    if args.strict and _dry_run(args, queue, source, quiet=True):
        print("--strict: invalid lines; nothing submitted", file=sys.stderr)
        return EXIT_INVALID
    summary, report_path = _run(args, queue, source)
    print(_human(summary), file=sys.stderr)
    print(json.dumps(summary.as_dict()))
    if args.download and report_path and not summary.interrupted:
        code = download_command(queue, report_path, args.download, args.silent, out=sys.stderr)
        return summary.exit_code or code
    return summary.exit_code


def download_command(
    queue: Any, report: str, folder: str, silent: bool = False, workers: int = 8, out: Any = None
) -> int:
    """Fetch a report's images into ``folder``; 0 when every image is there, 1 otherwise."""
    from sdqueue.bulk_download import download

    result = download(queue.storage, report, folder, workers, show=not silent)
    for error in result.errors or []:
        print(error, file=sys.stderr)
    body = {"downloaded": result.downloaded, "skipped": result.skipped, "failed": result.failed}
    print(json.dumps(body), file=out or sys.stdout)
    return 1 if result.failed else 0
