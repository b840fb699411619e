"""``sdqueue download REPORT DIR``: fetch the images a bulk report lists, resumable, with a progress bar.

Image ``i`` of a line is saved as ``DIR/{job_id}_{i}.png`` (the job id is the line's stable id:
its own ``job_id`` or the content hash, so the name survives edits of other lines). Each file is
written to ``*.part`` and renamed when complete, so a file that exists is whole and is skipped
when the command runs again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdqueue.bulk_report import read_report
from sdqueue.errors import SdqError


@dataclass(frozen=True)
class Fetch:
    """One image to fetch: its s3:// URL and where it goes."""

    url: str
    path: Path


@dataclass
class DownloadSummary:
    """What a download run did."""

    downloaded: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[str] | None = None


def image_name(job_id: str, index: int, url: str) -> str:
    """The file name of image ``index`` of a job (the URL's extension, .png by default)."""
    suffix = os.path.splitext(url)[1] or ".png"
    return f"{job_id}_{index}{suffix}"


def fetches(report: str, folder: Path) -> Iterator[Fetch]:
    """The images of the report's succeeded lines (a duplicate line shares its original's files)."""
    for record in read_report(report):
        job_id = record.get("job_id")
        if record.get("state") != "succeeded" or not job_id:
            continue
        for index, url in enumerate(record.get("images") or []):
            yield Fetch(url, folder / image_name(job_id, index, url))


class Downloader:
    """Fetches images through the client's S3 client, several at a time."""

    def __init__(self, storage: Any, workers: int = 8) -> None:
        self.client = storage.client
        self.workers = workers

    def fetch(self, item: Fetch) -> None:
        bucket, _, key = item.url.removeprefix("s3://").partition("/")
        if not item.url.startswith("s3://") or not key:
            raise SdqError(f"{item.url!r} is not an s3:// URL")
        part = item.path.with_name(item.path.name + ".part")
        self.client.download_file(bucket, key, str(part))
        os.replace(part, item.path)

    def run(self, items: Iterable[Fetch], progress: Any = None) -> DownloadSummary:
        """Fetch what is not already there, a chunk at a time; ``progress(advance)`` per file."""
        summary = DownloadSummary(errors=[])
        with ThreadPoolExecutor(self.workers) as pool:
            for chunk in _chunks(items, 256):
                todo = [item for item in chunk if not item.path.exists()]
                summary.skipped += len(chunk) - len(todo)
                if progress:
                    progress(len(chunk) - len(todo))
                for item, error in zip(todo, pool.map(self._try, todo), strict=True):
                    self._count(summary, item, error)
                    if progress:
                        progress(1)
        return summary

    @staticmethod
    def _count(summary: DownloadSummary, item: Fetch, error: str | None) -> None:
        if error is None:
            summary.downloaded += 1
            return
        summary.failed += 1
        assert summary.errors is not None
        if len(summary.errors) < 20:
            summary.errors.append(f"{item.url}: {error}")

    def _try(self, item: Fetch) -> str | None:
        try:
            self.fetch(item)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None


def download(storage: Any, report: str, folder: str, workers: int = 8, show: bool = True) -> DownloadSummary:
    """Fetch every image of a report into ``folder`` with a rich progress bar on stderr."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    downloader = Downloader(storage, workers)
    if not show:
        return downloader.run(fetches(report, target))
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    total = sum(1 for _ in fetches(report, target))
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress("download", *columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("download", total=total)
        return downloader.run(fetches(report, target), lambda n: bar.advance(task, n))


def _chunks(items: Iterable[Fetch], size: int) -> Iterator[list[Fetch]]:
    chunk: list[Fetch] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
