"""Read bulk job files: JSONL (one job object a line) or CSV (one job a row, columns = spec fields).

CSV cells are typed by the job contract: ``steps`` becomes an int, ``guidance_scale`` a float,
``output.bucket`` fills the nested ``output`` object; an empty cell leaves the field at its
default. In JSONL, blank lines and lines starting with ``#`` are skipped. Rows are read one at a
time (a file of any length is never held in memory); every problem is reported with its line
number.
"""

from __future__ import annotations

import csv
import json
import types
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from sdqueue.contract import Img2ImgJob, InpaintJob, OutputLocation, Txt2ImgJob

FORMATS = ("jsonl", "csv")


class Row:
    """One job line of the input: its 1-based line number and the raw spec, or why it is unusable.

    A JSONL row keeps its ``text`` and parses it only when ``spec`` or ``error`` is read: the bulk
    preparer validates the text itself (pydantic's JSON parser, no dict in between) and reads
    ``spec`` only for lines that do not validate as they stand or that name a local input file.
    ``default_mode`` is the mode of a JSONL line that names none."""

    __slots__ = ("line", "text", "default_mode", "_spec", "_error", "_parsed")

    def __init__(
        self,
        line: int,
        spec: dict[str, Any] | None = None,
        error: str | None = None,
        *,
        text: str | None = None,
        default_mode: str | None = None,
    ) -> None:
        self.line = line
        self.text = text
        self.default_mode = default_mode
        self._spec, self._error, self._parsed = spec, error, text is None

    @property
    def spec(self) -> dict[str, Any] | None:
        """The line as a dict (None when it is not a JSON object)."""
        self._parse()
        return self._spec

    @property
    def error(self) -> str | None:
        """Why the line is unusable, when it is."""
        self._parse()
        return self._error

    def _parse(self) -> None:
        if self._parsed:
            return
        self._parsed = True
        spec, self._error = parse_object(self.text or "")
        if spec is not None and self.default_mode and "mode" not in spec:
            spec = {"mode": self.default_mode, **spec}
        self._spec = spec


def parse_object(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """A JSONL line as a dict, or why it is not one."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(spec, dict):
        return None, f"a job must be a JSON object, got {type(spec).__name__}"
    return spec, None


def _scalar(annotation: Any) -> type:
    """The plain type (int, float, str) behind Optional[...], Annotated[...] and Literal[...]."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return _scalar(next(arg for arg in get_args(annotation) if arg is not type(None)))
    if origin is Literal:
        return type(get_args(annotation)[0])
    return annotation if isinstance(annotation, type) else str


def _column_types() -> dict[str, type]:
    types_: dict[str, type] = {}
    for model in (Txt2ImgJob, Img2ImgJob, InpaintJob):
        types_.update({name: _scalar(field.annotation) for name, field in model.model_fields.items()})
    types_.pop("output")
    for name, field in OutputLocation.model_fields.items():
        types_[f"output.{name}"] = _scalar(field.annotation)
    return types_


COLUMN_TYPES = _column_types()


def parse_loras(value: str) -> list[dict[str, Any]]:
    """A CSV ``loras`` cell: ``name`` or ``name:scale`` items separated by ``;``
    (``detail:0.8;style`` -> detail at 0.8, style at its default 1.0)."""
    loras: list[dict[str, Any]] = []
    for item in value.split(";"):
        name, _, scale = item.strip().partition(":")
        if not name.strip():
            raise ValueError(
                f"column 'loras': {value!r} has an empty adapter name; write name or name:scale, separated by ;"
            )
        lora: dict[str, Any] = {"name": name.strip()}
        if scale.strip():
            try:
                lora["scale"] = float(scale)
            except ValueError:
                raise ValueError(
                    f"column 'loras': scale {scale.strip()!r} of {name.strip()!r} is not a number"
                ) from None
        loras.append(lora)
    return loras


def _convert(column: str, value: str) -> Any:
    if column == "loras":
        return parse_loras(value)
    kind = COLUMN_TYPES[column]
    if kind is int:
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"column {column!r}: {value!r} is not a whole number") from None
    if kind is float:
        try:
            return float(value.strip())
        except ValueError:
            raise ValueError(f"column {column!r}: {value!r} is not a number") from None
    return value


def spec_from_cells(cells: dict[str, str]) -> dict[str, Any]:
    """A job spec from one CSV row (column -> text); empty cells are left out."""
    spec: dict[str, Any] = {}
    for column, value in cells.items():
        if value is None or value == "":
            continue
        typed = _convert(column, value)
        if column.startswith("output."):
            spec.setdefault("output", {})[column.removeprefix("output.")] = typed
        else:
            spec[column] = typed
    return spec


def read_jsonl(lines: Iterable[str], default_mode: str | None = None) -> Iterator[Row]:
    """Rows of a JSONL stream (blank and ``#`` lines skipped, line numbers kept), parsed lazily."""
    for number, text in enumerate(lines, start=1):
        text = text.strip()
        if text and not text.startswith("#"):
            yield Row(number, text=text, default_mode=default_mode)


def read_csv(lines: Iterable[str]) -> Iterator[Row]:
    """Rows of a CSV stream whose header names job fields (first line is the header)."""
    reader = csv.DictReader(lines, strict=True)
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        yield Row(1, None, f"unreadable CSV header ({exc})")
        return
    unknown = [column for column in header if column not in COLUMN_TYPES]
    if unknown or not header:
        known = ", ".join(sorted(COLUMN_TYPES))
        yield Row(1, None, f"unknown column(s) {unknown or '(no header)'}; columns are job fields: {known}")
        return
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Row(start, None, f"unreadable CSV ({exc})")
            return
        if None in cells:
            yield Row(start, None, f"{len(header) + len(cells[None])} cells but {len(header)} columns")
            continue
        try:
            yield Row(start, spec_from_cells(cells))
        except ValueError as exc:
            yield Row(start, None, str(exc))


def read_rows(lines: Iterable[str], fmt: str, default_mode: str | None = None) -> Iterator[Row]:
    """The rows of a JSONL or CSV stream, one at a time; ``default_mode`` fills rows that name no mode."""
    if fmt != "csv":
        yield from read_jsonl(lines, default_mode)
        return
    for row in read_csv(lines):
        if row.spec is not None and default_mode and "mode" not in row.spec:
            row = Row(row.line, {"mode": default_mode, **row.spec})
        yield row


def count_lines(path: str) -> int:
    """Lines of a file (a fast byte scan, for the progress bar's total and ETA)."""
    count, last = 0, b"\n"
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def guess_format(path: str) -> str:
    """csv for ``*.csv``, jsonl for anything else (``-`` included)."""
    return "csv" if path.lower().endswith(".csv") else "jsonl"
