"""``.parquet``: columns of integer, floating or boolean type only, no nulls (read with pyarrow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.formats.base import DatasetFileError, DatasetFormat, Stats, budget, check_entries, duplicate, sentence


def _open(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetFileError(
            f"the file is not a valid Parquet file, or it is truncated ({sentence(exc)})", "corrupt"
        ) from None


def _row_bytes(schema) -> int:
    """Bytes per row once decoded, after checking the column names and types."""
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
    return sum(widths)


def _feed_batches(pf, names: list[str], rows: int) -> list[Stats]:
    """Statistics of every column, read in batches; nulls and a wrong row count are refused."""
    import numpy as np

    stats = [Stats(f"column {n!r}", lambda i: f"row {i}") for n in names]
    seen = 0
    for batch in pf.iter_batches(batch_size=65536):
        for j, col in enumerate(batch.columns):
            if col.null_count:
                first = int(np.argmax(np.asarray(col.is_null())))
                raise DatasetFileError(
                    f"column {names[j]!r} has missing values (null), the first at row "
                    f"{seen + first}; missing values are not allowed",
                    "missing_values",
                )
            stats[j].update(col.to_numpy(zero_copy_only=False))
        seen += batch.num_rows
    if seen != rows:
        raise DatasetFileError(
            f"the Parquet file is corrupt: its metadata says {rows} rows but {seen} were read", "corrupt"
        )
    return stats


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
        schema = pf.schema_arrow
        names = list(schema.names)
        row_bytes = _row_bytes(schema)
        rows = pf.metadata.num_rows
        budget(rows * row_bytes, max_decoded, "the columns")
        if rows == 0:
            raise DatasetFileError("the Parquet file has no rows", "empty")
        stats = _feed_batches(pf, names, rows)
    except DatasetFileError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetFileError(
            f"the Parquet file is corrupt or truncated ({sentence(exc)})", "corrupt"
        ) from None
    items = [
        {"name": n, "shape": [rows], "dtype": _dtype_name(schema.field(n).type), **stats[j].facts()}
        for j, n in enumerate(names)
    ]
    return {"kind": "columns", "rows": rows, "items": items}


def read(path: Path, names: list[str]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=names)
    return {n: table.column(n).to_numpy() for n in names}


FORMAT = DatasetFormat(name="parquet", suffixes=(".parquet",), holds="columns", inspect=inspect, read=read)
