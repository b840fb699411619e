"""The results index of a bulk run: one record a line, JSONL or CSV, written as results arrive.

Records are appended in the order lines settle (not in input order) and flushed after every
batch, so a run killed half way leaves a readable index of everything settled so far. Fields:
``line``, ``job_id``, ``state``, ``prompt``, ``images`` (s3:// URLs), ``seeds``, ``error``, and where
they apply ``resumed``, ``duplicate_of`` and ``http_urls`` (``--presign``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from typing import IO, Any

CSV_FIELDS = ("line", "job_id", "state", "prompt", "images", "seeds", "error", "resumed", "duplicate_of")
LIST_FIELDS = ("images", "seeds", "http_urls")


def report_format(path: str, fmt: str | None) -> str:
    """csv when asked for or when the path ends in .csv, else jsonl."""
    return fmt or ("csv" if path.lower().endswith(".csv") else "jsonl")


class ReportWriter:
    """Appends records to a JSONL or CSV file; ``flush`` after each batch keeps it readable."""

    def __init__(
        self, path: str, fmt: str | None = None, presign: Callable[[str], str] | None = None
    ) -> None:
        self.format = report_format(path, fmt)
        self.presign = presign
        self.stream: IO[str] = open(path, "w", encoding="utf-8", newline="")
        self.csv: Any = None
        if self.format == "csv":
            fields = CSV_FIELDS + (("http_urls",) if presign else ())
            self.csv = csv.DictWriter(self.stream, fieldnames=fields, extrasaction="ignore")
            self.csv.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        if self.presign and record.get("images"):
            record = {**record, "http_urls": [self.presign(url) for url in record["images"]]}
        if self.csv is None:
            self.stream.write(json.dumps(record) + "\n")
            return
        row = {
            key: " ".join(str(v) for v in value) if key in LIST_FIELDS else value
            for key, value in record.items()
        }
        self.csv.writerow(row)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


def read_report(path: str, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """The records of a report (JSONL or CSV); a torn last line of a killed run is skipped."""
    with open(path, encoding="utf-8", newline="") as stream:
        if report_format(path, fmt) == "csv":
            for row in csv.DictReader(stream):
                yield {key: value.split() if key in LIST_FIELDS else value for key, value in row.items()}
            return
        for text in stream:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record
