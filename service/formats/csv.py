"""``.csv``: UTF-8, comma-separated, a header row of column names, then numbers only.

Every cell is checked as the file streams (``rows``); a column is int64 when every cell of it is
a 64-bit integer, else float64. (This module is ``service.formats.csv``; ``import csv`` in it is
the standard library's.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.formats.base import (
    MAX_ENTRIES,
    DatasetFileError,
    DatasetFormat,
    Stats,
    budget,
    check_entries,
    duplicate,
    non_finite_word,
)

MAX_RECORD_CHARS = 1 << 20  # characters in one row (the header or a data row) of the CSV text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _number(cell: str) -> int | float | None:
    s = cell.strip()
    try:
        v = int(s)
        return v if -(2**63) <= v < 2**63 else float(v)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return None


def _header(header: list[str] | None) -> list[str]:
    """The checked column names of the first row (None: the file is empty)."""
    if header is None:
        raise DatasetFileError("the CSV file is empty: it needs a header row of column names", "empty")
    check_entries(len(header), "columns")  # before any work per column
    names = [h.strip() for h in header]
    for j, name in enumerate(names):
        if not name:
            raise DatasetFileError(f"the CSV header (line 1) has no name for column {j + 1}", "bad_header")
    dupe = duplicate(names)
    if dupe is not None:
        raise DatasetFileError(f"the CSV header (line 1) names column {dupe!r} more than once", "bad_header")
    if all(_number(n) is not None for n in names):
        raise DatasetFileError(
            "the first line of the CSV file holds numbers, not column names; add a header row naming the columns",
            "bad_header",
        )
    return names


def _cell(cell: str, column: str, line: int) -> int | float:
    """The number in one cell, or DatasetFileError naming its column and line."""
    v = _number(cell)
    if v is None:
        shown = cell.strip()
        why = (
            "has an empty cell (missing values are not allowed)"
            if not shown
            else (f"holds {shown[:40]!r}, which is not a number")
        )
        raise DatasetFileError(f"column {column!r} is not numeric: line {line} {why}", "non_numeric")
    if isinstance(v, float) and not math.isfinite(v):
        raise DatasetFileError(
            f"column {column!r} contains {non_finite_word(v)} at line {line}; NaN and infinity "
            "are not allowed in datasets",
            "non_finite",
        )
    return v


def _row(row: list[str], names: list[str], line: int) -> list[int | float]:
    if len(row) != len(names):
        raise DatasetFileError(
            f"the CSV rows are ragged: line {line} has {_plural(len(row), 'cell')} but "
            f"the header has {_plural(len(names), 'column')}",
            "ragged_rows",
        )
    return [_cell(cell, names[j], line) for j, cell in enumerate(row)]


def _blank(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


class _Lines:
    """The file's lines for ``csv.reader``, refused once one record (its header or a row, which
    quoted cells may spread over several lines) passes ``MAX_RECORD_CHARS``: no line is ever read
    whole, and the reader never holds more than one bounded record. ``record_done()`` after each."""

    def __init__(self, f) -> None:
        self.f = f
        self.line = 0
        self.first = 1  # the line the current record starts on
        self.pending = 0  # characters of the current record so far

    def __iter__(self) -> Iterator[str]:
        readline, cap = self.f.readline, MAX_RECORD_CHARS
        while text := readline(cap + 1):
            self.line += 1
            self.pending += len(text)
            if self.pending > cap:
                raise self._too_long(text)
            yield text

    def record_done(self) -> None:
        self.first, self.pending = self.line + 1, 0

    def _too_long(self, text: str) -> DatasetFileError:
        if self.first == 1 and text.count(",") >= MAX_ENTRIES:
            return DatasetFileError(
                f"the CSV header (line 1) has more than {MAX_ENTRIES} columns; at most {MAX_ENTRIES} are accepted",
                "too_many_entries",
            )
        where = "the CSV header (line 1)" if self.first == 1 else f"the CSV row starting at line {self.first}"
        return DatasetFileError(
            f"{where} is longer than {MAX_RECORD_CHARS} characters, the most one row may hold", "too_large"
        )


def rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(0, header)`` then ``(line number, numbers)`` per data row, every cell checked."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = _Lines(f)
            reader = csv.reader(lines, strict=True)
            names = _header(next(reader, None))
            lines.record_done()
            yield 0, names
            for row in reader:
                lines.record_done()
                if not _blank(row):
                    yield reader.line_num, _row(row, names, reader.line_num)
    except UnicodeDecodeError as exc:
        raise DatasetFileError(
            f"the CSV file is not UTF-8 text (undecodable byte at position {exc.start}); is it really a CSV file?",
            "corrupt",
        ) from None
    except csv.Error as exc:
        raise DatasetFileError(f"the file is not valid CSV: {exc}", "corrupt") from None


def inspect(path: Path, max_decoded: int) -> dict[str, Any]:
    lines = rows(path)
    _, names = next(lines)
    stats = [Stats(f"column {n!r}", lambda i: f"row {i}") for n in names]
    ints = [True] * len(names)
    count = 0
    for _line, values in lines:
        count += 1
        if count % 65536 == 0:
            budget(count * len(names) * 8, max_decoded, "the columns")
        for j, v in enumerate(values):
            if ints[j] and isinstance(v, float):
                ints[j] = False
            stats[j].add(v)
    if count == 0:
        raise DatasetFileError("the CSV file has a header but no data rows", "empty")
    budget(count * len(names) * 8, max_decoded, "the columns")
    items = []
    for j, name in enumerate(names):
        facts = stats[j].facts()
        if not ints[j]:
            facts["min"], facts["max"] = float(facts["min"]), float(facts["max"])
        items.append({"name": name, "shape": [count], "dtype": "int64" if ints[j] else "float64", **facts})
    return {"kind": "columns", "rows": count, "items": items}


def read(path: Path, names: list[str]) -> dict[str, Any]:
    from array import array

    import numpy as np

    lines = rows(path)
    _, header = next(lines)
    index = {n: j for j, n in enumerate(header)}
    for n in names:
        if n not in index:
            raise KeyError(n)
    cols = {n: array("d") for n in names}
    ints = {n: array("q") for n in names}
    is_int = {n: True for n in names}
    for _line, values in lines:
        for n in names:
            v = values[index[n]]
            if is_int[n] and isinstance(v, int):
                ints[n].append(v)
            elif is_int[n]:
                is_int[n] = False
            cols[n].append(float(v))
    return {
        n: np.frombuffer(ints[n], dtype=np.int64).copy()
        if is_int[n]
        else np.frombuffer(cols[n], dtype=np.float64).copy()
        for n in names
    }


FORMAT = DatasetFormat(name="csv", suffixes=(".csv",), holds="columns", inspect=inspect, read=read)
