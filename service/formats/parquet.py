"""``.parquet``: columns of integer, floating or boolean type only, no nulls (read with pyarrow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.formats.base import (
    CHUNK_BYTES,
    DatasetFileError,
    DatasetFormat,
    Stats,
    budget,
    check_entries,
    duplicate,
    sentence,
)

MAX_FOOTER = 16 * 1024 * 1024  # bytes of file metadata (schema and row groups), parsed before anything else
COLUMNS_PER_PASS = 16  # columns decoded side by side; a wider file is read in several passes
BUFFER_BYTES = 64 * 1024  # read buffer per column being decoded


def _check_footer(path: Path) -> None:
    """Refuse metadata over ``MAX_FOOTER`` bytes before pyarrow parses it (the last 8 bytes of a
    Parquet file are the metadata's length and ``PAR1``)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 12:
            return  # pyarrow names what is wrong
        f.seek(size - 8)
        tail = f.read(8)
    length = int.from_bytes(tail[:4], "little")
    if tail[4:] == b"PAR1" and MAX_FOOTER < length <= size - 12:  # longer than the file: pyarrow says corrupt
        raise DatasetFileError(
            f"the Parquet file's metadata is {length} bytes, above the limit of {MAX_FOOTER} bytes "
            "(too many columns or row groups)",
            "too_large",
        )


def _open(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_footer(path)
    try:
        return pq.ParquetFile(path, buffer_size=BUFFER_BYTES, pre_buffer=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetFileError(
            f"the file is not a valid Parquet file, or it is truncated ({sentence(exc)})", "corrupt"
        ) from None


def _widths(schema) -> list[int]:
    """Bytes per value of each column once decoded, after checking the column names and types."""
    import pyarrow as pa

    names = list(schema.names)
    check_entries(len(names), "columns")
    dupe = duplicate(names)
    if dupe is not None:
        raise DatasetFileError(f"the Parquet file names column {dupe!r} more than once", "bad_header")
    widths = []
    for field in schema:
        t = field.type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise DatasetFileError(
                f"column {field.name!r} has type {t}, which is not numeric; only integer, "
                "floating and boolean columns are accepted",
                "non_numeric",
            )
        widths.append(max(1, t.bit_width // 8))
    return widths


def _feed_column(stats: Stats, col, name: str, seen: int) -> None:
    import numpy as np

    if col.null_count:
        first = int(np.argmax(np.asarray(col.is_null())))
        raise DatasetFileError(
            f"column {name!r} has missing values (null), the first at row {seen + first}; "
            "missing values are not allowed",
            "missing_values",
        )
    stats.update(col.to_numpy(zero_copy_only=False))


def _feed_batches(pf, names: list[str], widths: list[int], rows: int) -> list[Stats]:
    """Statistics of every column; nulls and a wrong row count are refused.

    At most ``COLUMNS_PER_PASS`` columns are decoded at once, in batches of about ``CHUNK_BYTES``
    (a file of 4096 columns was read 65,536 rows at a time: 2 GiB per batch).
    """
    stats = {n: Stats(f"column {n!r}", lambda i: f"row {i}") for n in names}
    for lo in range(0, len(names), COLUMNS_PER_PASS):
        group = names[lo : lo + COLUMNS_PER_PASS]
        wanted = set(group)  # a name selects nested fields under it too: only this pass's columns count
        batch_rows = max(1, min(65536, CHUNK_BYTES // sum(widths[lo : lo + COLUMNS_PER_PASS])))
        seen = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=group, use_threads=False):
            for name, col in zip(batch.schema.names, batch.columns, strict=True):
                if name in wanted:
                    _feed_column(stats[name], col, name, seen)
            seen += batch.num_rows
        if seen != rows:
            raise DatasetFileError(
                f"the Parquet file is corrupt: its metadata says {rows} rows but {seen} were read", "corrupt"
            )
    return [stats[n] for n in names]


def _dtype_name(t) -> str:
    import pyarrow as pa

    if pa.types.is_boolean(t):
        return "bool"
    name = str(t)
    return {"halffloat": "float16", "float": "float32", "double": "float64"}.get(name, name)


def inspect(path: Path, max_decoded: int) -> dict[str, Any]:
    import pyarrow as pa

    pf = _open(path)
    try:
        check_entries(pf.metadata.num_columns, "columns")  # before the schema is converted column by column
        schema = pf.schema_arrow
        names = list(schema.names)
        widths = _widths(schema)
        rows = pf.metadata.num_rows
        budget(rows * sum(widths), max_decoded, "the columns")
        if rows == 0:
            raise DatasetFileError("the Parquet file has no rows", "empty")
        stats = _feed_batches(pf, names, widths, rows)
    except DatasetFileError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetFileError(f"the Parquet file is corrupt or truncated ({sentence(exc)})", "corrupt") from None
    items = [
        {"name": n, "shape": [rows], "dtype": _dtype_name(schema.field(n).type), **stats[j].facts()}
        for j, n in enumerate(names)
    ]
    return {"kind": "columns", "rows": rows, "items": items}


def read(path: Path, names: list[str]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    for n in names:
        if n not in present:
            raise KeyError(n)  # as the other formats (pyarrow would raise ArrowInvalid)
    table = pq.read_table(path, columns=names)
    return {n: table.column(n).to_numpy() for n in names}


FORMAT = DatasetFormat(name="parquet", suffixes=(".parquet",), holds="columns", inspect=inspect, read=read)
