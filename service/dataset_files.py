"""Dataset files: check an uploaded file and describe it, and read arrays back out of it.

Four formats, chosen by the file's extension:

* ``.safetensors``: parsed here (8-byte header length, JSON header, raw little-endian data); the
  header is checked like the reference implementation does (dtypes, shapes, offsets contiguous
  and covering the data exactly), so a truncated or padded file is refused.
* ``.npz``: a zip of ``.npy`` members. Each member's header is read with numpy's own header
  parser; a member whose dtype holds Python objects (which only pickle could load) is refused
  before any of its data is read, and readers use ``numpy.load(allow_pickle=False)``.
* ``.csv``: UTF-8, comma-separated, a header row of column names, then numbers only.
* ``.parquet``: columns of integer, floating or boolean type only, no nulls.

Nothing here trusts the file: no pickle, no code, no network. Values are read in chunks so
checking a file holds little memory whatever its size, and every problem raises
``DatasetFileError`` with a sentence naming the tensor or column (and row) and the reason.

numpy and pyarrow are imported inside the functions that need them, so that importing this
module (the API does) stays light.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FORMATS = {".safetensors": "safetensors", ".npz": "npz", ".csv": "csv", ".parquet": "parquet"}
TENSOR_FORMATS = ("safetensors", "npz")
COLUMN_FORMATS = ("csv", "parquet")

MAX_ENTRIES = 4096  # tensors or columns per file
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # as the reference implementation
CHUNK_BYTES = 16 * 1024 * 1024  # values checked per step

# safetensors dtype -> (numpy dtype string, public name)
_ST_DTYPES = {
    "F64": ("<f8", "float64"),
    "F32": ("<f4", "float32"),
    "F16": ("<f2", "float16"),
    "BF16": ("<u2", "bfloat16"),  # converted to float32 when read
    "I64": ("<i8", "int64"),
    "I32": ("<i4", "int32"),
    "I16": ("<i2", "int16"),
    "I8": ("i1", "int8"),
    "U64": ("<u8", "uint64"),
    "U32": ("<u4", "uint32"),
    "U16": ("<u2", "uint16"),
    "U8": ("u1", "uint8"),
    "BOOL": ("?", "bool"),
}


class DatasetFileError(ValueError):
    """A file that cannot be accepted. ``str(exc)`` is a sentence for the client; ``code`` a short type."""

    def __init__(self, message: str, code: str = "invalid_file") -> None:
        super().__init__(message)
        self.code = code


def format_for(filename: str) -> str:
    """The format named by the file's extension, or ``DatasetFileError``."""
    suffix = Path(filename).suffix.lower()
    if suffix in FORMATS:
        return FORMATS[suffix]
    got = f"extension {suffix!r}" if suffix else "no extension"
    raise DatasetFileError(
        f"{filename!r} has {got}; upload a .safetensors, .npz, .csv or .parquet file",
        "unsupported_format",
    )


# ---------------------------------------------------------------- statistics


def _where(shape: tuple[int, ...], flat: int, fortran: bool = False) -> str:
    import numpy as np

    if len(shape) <= 1:
        return f"index {flat}"
    idx = np.unravel_index(flat, shape, order="F" if fortran else "C")
    return "index [" + ", ".join(str(int(i)) for i in idx) + "]"


class _Stats:
    """Running min, max and "every value is a whole number" of one tensor or column.

    ``what`` names it in messages ("tensor 'x'", "column 'age'"); ``locate(i)`` turns the
    position of a value (counted in the order values are fed) into words.
    """

    def __init__(self, what: str, locate: Callable[[int], str]) -> None:
        self.what = what
        self.locate = locate
        self.min: float | int | None = None
        self.max: float | int | None = None
        self.integer = True
        self.seen = 0

    def update(self, values) -> None:
        import numpy as np

        n = int(values.size)
        if n == 0:
            return
        kind = values.dtype.kind
        if kind == "b":
            values = values.astype(np.uint8)
            kind = "u"
        if kind == "f":
            finite = np.isfinite(values)
            if not finite.all():
                first = int(np.argmin(finite))
                bad = values[first]
                word = "NaN" if np.isnan(bad) else ("-infinity" if bad < 0 else "infinity")
                count = n - int(np.count_nonzero(finite))
                more = " (and other non-finite values)" if count > 1 else ""
                raise DatasetFileError(
                    f"{self.what} contains {word} at {self.locate(self.seen + first)}{more}; "
                    "NaN and infinity are not allowed in datasets",
                    "non_finite",
                )
            if self.integer:
                self.integer = bool(np.all(values == np.floor(values)))
            lo, hi = float(values.min()), float(values.max())
        else:
            lo, hi = int(values.min()), int(values.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        self.seen += n

    def add(self, value: float | int) -> None:
        """One value (CSV); the caller has checked it is finite."""
        if self.integer and isinstance(value, float) and not value.is_integer():
            self.integer = False
        self.min = value if self.min is None or value < self.min else self.min
        self.max = value if self.max is None or value > self.max else self.max
        self.seen += 1

    def facts(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "integer": self.integer}


def _check_entries(count: int, kind: str) -> None:
    if count > MAX_ENTRIES:
        raise DatasetFileError(
            f"the file has {count} {kind}; at most {MAX_ENTRIES} are accepted", "too_many_entries"
        )


def _budget(need: int, limit: int, what: str) -> None:
    if need > limit:
        raise DatasetFileError(
            f"{what} hold {need} bytes once decoded, above the limit of {limit} bytes "
            "(GRADTUNE_MAX_DATASET_BYTES)",
            "too_large",
        )


# ---------------------------------------------------------------- safetensors


def _safetensors_layout(path: Path) -> tuple[int, list[dict[str, Any]]]:
    """(offset of the data buffer, entries sorted by offset) of a checked safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DatasetFileError(
                f"the safetensors file is truncated: {size} bytes, shorter than its 8-byte header length",
                "truncated",
            )
        n = int.from_bytes(head, "little")
        if n > MAX_SAFETENSORS_HEADER:
            raise DatasetFileError(
                f"the safetensors header claims {n} bytes, more than the {MAX_SAFETENSORS_HEADER} "
                "allowed: the file is corrupt or not safetensors",
                "corrupt",
            )
        if 8 + n > size:
            raise DatasetFileError(
                f"the safetensors file is truncated: its header needs {n} bytes but only "
                f"{size - 8} follow the length",
                "truncated",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DatasetFileError(
            "the safetensors header is not valid JSON: the file is corrupt or not safetensors",
            "corrupt",
        ) from None
    if not isinstance(header, dict):
        raise DatasetFileError("the safetensors header is not a JSON object: the file is corrupt", "corrupt")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise DatasetFileError("the safetensors __metadata__ must map strings to strings", "corrupt")
    _check_entries(len(header), "tensors")
    entries = []
    for name, info in header.items():
        what = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise DatasetFileError(
                f"{what}: the header entry must have exactly dtype, shape and data_offsets", "corrupt"
            )
        st_dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if st_dtype not in _ST_DTYPES:
            raise DatasetFileError(
                f"{what} has dtype {st_dtype!r}, which is not supported; use one of "
                + ", ".join(_ST_DTYPES),
                "unsupported_dtype",
            )
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise DatasetFileError(f"{what}: shape must be a list of non-negative integers", "corrupt")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise DatasetFileError(f"{what}: data_offsets must be [begin, end] with begin <= end", "corrupt")
        np_dtype, public = _ST_DTYPES[st_dtype]
        itemsize = 1 if st_dtype in ("I8", "U8", "BOOL") else int(np_dtype[2:])
        count = math.prod(shape)
        if offsets[1] - offsets[0] != count * itemsize:
            raise DatasetFileError(
                f"{what}: shape {shape} of {st_dtype} needs {count * itemsize} bytes but its "
                f"data_offsets span {offsets[1] - offsets[0]}: the file is corrupt",
                "corrupt",
            )
        entries.append(
            {"name": name, "st_dtype": st_dtype, "np_dtype": np_dtype, "dtype": public,
             "shape": shape, "begin": offsets[0], "end": offsets[1], "count": count}
        )
    entries.sort(key=lambda e: (e["begin"], e["end"]))
    expected = 0
    for e in entries:
        if e["begin"] != expected:
            raise DatasetFileError(
                f"tensor {e['name']!r}: its data starts at byte {e['begin']} of the data buffer, "
                f"expected {expected} (tensors must be stored back to back): the file is corrupt",
                "corrupt",
            )
        expected = e["end"]
    available = size - 8 - n
    if expected > available:
        raise DatasetFileError(
            f"the safetensors file is truncated: its header describes {expected} bytes of tensor "
            f"data but only {available} are present",
            "truncated",
        )
    if expected < available:
        raise DatasetFileError(
            f"the safetensors file has {available - expected} bytes after its last tensor: "
            "the file is corrupt",
            "corrupt",
        )
    return 8 + n, entries


def _st_chunks(path: Path, start: int, e: dict[str, Any]) -> Iterator[Any]:
    """The tensor's values as flat numpy chunks (bfloat16 widened to float32)."""
    import numpy as np

    if e["count"] == 0:
        return
    dtype = np.dtype(e["np_dtype"])
    step = max(1, CHUNK_BYTES // dtype.itemsize)
    mm = np.memmap(path, dtype=dtype, mode="r", offset=start + e["begin"], shape=(e["count"],))
    try:
        for i in range(0, e["count"], step):
            chunk = np.asarray(mm[i : i + step])
            yield _bf16_to_f32(chunk) if e["st_dtype"] == "BF16" else chunk
    finally:
        del mm


def _bf16_to_f32(raw):
    import numpy as np

    return (raw.astype(np.uint32) << 16).view(np.float32)


def _inspect_safetensors(path: Path, max_decoded: int) -> dict[str, Any]:
    start, entries = _safetensors_layout(path)
    _budget(sum(e["end"] - e["begin"] for e in entries), max_decoded, "the tensors")
    items = []
    for e in sorted(entries, key=lambda e: e["name"]):
        shape = tuple(e["shape"])
        stats = _Stats(f"tensor {e['name']!r}", lambda i, s=shape: _where(s, i))
        for chunk in _st_chunks(path, start, e):
            stats.update(chunk)
        items.append({"name": e["name"], "shape": list(shape), "dtype": e["dtype"], **stats.facts()})
    return {"kind": "tensors", "rows": None, "items": items}


def _read_safetensors(path: Path, name: str):
    import numpy as np

    start, entries = _safetensors_layout(path)
    for e in entries:
        if e["name"] == name:
            dtype = np.dtype(e["np_dtype"])
            with open(path, "rb") as f:
                f.seek(start + e["begin"])
                flat = np.fromfile(f, dtype=dtype, count=e["count"])
            if flat.size != e["count"]:
                raise DatasetFileError(f"tensor {name!r} is truncated", "truncated")
            if e["st_dtype"] == "BF16":
                flat = _bf16_to_f32(flat)
            return flat.reshape(e["shape"])
    raise KeyError(name)


# ---------------------------------------------------------------- npz


def _npy_header(fp, member: str):
    """(shape, fortran_order, dtype) of a .npy stream, with numpy's own (literal-only) parser."""
    import numpy as np
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except DatasetFileError:
        raise
    except Exception as exc:
        raise DatasetFileError(
            f"member {member!r} is not a valid .npy array ({_sentence(exc)}): the file is corrupt",
            "corrupt",
        ) from None
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


def _check_numeric_dtype(dtype, what: str) -> None:
    if dtype.hasobject:
        raise DatasetFileError(
            f"{what} holds Python objects (dtype {dtype.str!r}); loading it would need pickle, "
            "which is never allowed: save numeric arrays only (allow_pickle=False)",
            "pickle_not_allowed",
        )
    if dtype.names is not None or dtype.kind not in "biuf":
        raise DatasetFileError(
            f"{what} has dtype {str(dtype)!r}, which is not numeric; only integer, floating and "
            "boolean arrays are accepted",
            "non_numeric",
        )


def _sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _npz_members(zf) -> list[tuple[str, Any]]:
    seen: dict[str, Any] = {}
    for info in zf.infolist():
        if info.is_dir():
            continue
        if not info.filename.endswith(".npy"):
            raise DatasetFileError(
                f"member {info.filename!r} of the npz archive is not a .npy array", "corrupt"
            )
        name = info.filename[:-4]
        if name in seen:
            raise DatasetFileError(f"the npz archive holds array {name!r} twice", "corrupt")
        seen[name] = info
    _check_entries(len(seen), "arrays")
    return sorted(seen.items())


def _inspect_npz(path: Path, max_decoded: int) -> dict[str, Any]:
    import zipfile
    import zlib

    import numpy as np

    items = []
    decoded = 0
    try:
        with zipfile.ZipFile(path) as zf:
            members = _npz_members(zf)
            for name, info in members:
                what = f"array {name!r}"
                with zf.open(info) as fp:
                    shape, fortran, dtype = _npy_header(fp, info.filename)
                    _check_numeric_dtype(dtype, what)
                    count = math.prod(shape)
                    decoded += count * dtype.itemsize
                    _budget(decoded, max_decoded, "the arrays")
                    stats = _Stats(what, lambda i, s=shape, f=fortran: _where(s, i, f))
                    step = max(1, CHUNK_BYTES // max(1, dtype.itemsize))
                    left = count
                    while left:
                        take = min(step, left)
                        buf = fp.read(take * dtype.itemsize)
                        if len(buf) != take * dtype.itemsize:
                            raise DatasetFileError(
                                f"{what} is truncated: its header promises {count} values of "
                                f"{dtype.itemsize} bytes but the member holds fewer",
                                "truncated",
                            )
                        stats.update(np.frombuffer(buf, dtype=dtype))
                        left -= take
                items.append({"name": name, "shape": list(shape), "dtype": dtype.name, **stats.facts()})
    except DatasetFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError, RuntimeError) as exc:
        raise DatasetFileError(
            f"the npz archive is corrupt or truncated ({_sentence(exc)})", "corrupt"
        ) from None
    return {"kind": "tensors", "rows": None, "items": items}


def _read_npz(path: Path, name: str):
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        if name not in z.files:
            raise KeyError(name)
        return z[name]


# ---------------------------------------------------------------- csv


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


def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    """``(0, header)`` then ``(line number, numbers)`` per data row, every cell checked."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if header is None:
                raise DatasetFileError("the CSV file is empty: it needs a header row of column names", "empty")
            names = [h.strip() for h in header]
            for j, name in enumerate(names):
                if not name:
                    raise DatasetFileError(
                        f"the CSV header (line 1) has no name for column {j + 1}", "bad_header"
                    )
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise DatasetFileError(
                    f"the CSV header (line 1) names column {dupes[0]!r} more than once", "bad_header"
                )
            if all(_number(n) is not None for n in names):
                raise DatasetFileError(
                    "the first line of the CSV file holds numbers, not column names; "
                    "add a header row naming the columns",
                    "bad_header",
                )
            _check_entries(len(names), "columns")
            yield 0, names
            width = len(names)
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != width:
                    raise DatasetFileError(
                        f"the CSV rows are ragged: line {line} has {_plural(len(row), 'cell')} but "
                        f"the header has {_plural(width, 'column')}",
                        "ragged_rows",
                    )
                values = []
                for j, cell in enumerate(row):
                    v = _number(cell)
                    if v is None:
                        shown = cell.strip()
                        why = "has an empty cell (missing values are not allowed)" if not shown else (
                            f"holds {shown[:40]!r}, which is not a number"
                        )
                        raise DatasetFileError(
                            f"column {names[j]!r} is not numeric: line {line} {why}", "non_numeric"
                        )
                    if isinstance(v, float) and not math.isfinite(v):
                        word = "NaN" if math.isnan(v) else ("-infinity" if v < 0 else "infinity")
                        raise DatasetFileError(
                            f"column {names[j]!r} contains {word} at line {line}; NaN and infinity "
                            "are not allowed in datasets",
                            "non_finite",
                        )
                    values.append(v)
                yield line, values
    except UnicodeDecodeError as exc:
        raise DatasetFileError(
            f"the CSV file is not UTF-8 text (undecodable byte at position {exc.start}); "
            "is it really a CSV file?",
            "corrupt",
        ) from None
    except csv.Error as exc:
        raise DatasetFileError(f"the file is not valid CSV: {exc}", "corrupt") from None


def _inspect_csv(path: Path, max_decoded: int) -> dict[str, Any]:
    rows = _iter_csv(path)
    _, names = next(rows)
    stats = [_Stats(f"column {n!r}", lambda i: f"row {i}") for n in names]
    ints = [True] * len(names)
    count = 0
    for _line, values in rows:
        count += 1
        if count % 65536 == 0:
            _budget(count * len(names) * 8, max_decoded, "the columns")
        for j, v in enumerate(values):
            if ints[j] and isinstance(v, float):
                ints[j] = False
            stats[j].add(v)
    if count == 0:
        raise DatasetFileError("the CSV file has a header but no data rows", "empty")
    _budget(count * len(names) * 8, max_decoded, "the columns")
    items = []
    for j, name in enumerate(names):
        facts = stats[j].facts()
        if not ints[j]:
            facts["min"], facts["max"] = float(facts["min"]), float(facts["max"])
        items.append({"name": name, "shape": [count], "dtype": "int64" if ints[j] else "float64", **facts})
    return {"kind": "columns", "rows": count, "items": items}


def _read_csv(path: Path, names: list[str]) -> dict[str, Any]:
    from array import array

    import numpy as np

    rows = _iter_csv(path)
    _, header = next(rows)
    index = {n: j for j, n in enumerate(header)}
    for n in names:
        if n not in index:
            raise KeyError(n)
    cols = {n: array("d") for n in names}
    ints = {n: array("q") for n in names}
    is_int = {n: True for n in names}
    for _line, values in rows:
        for n in names:
            v = values[index[n]]
            if is_int[n] and isinstance(v, int):
                ints[n].append(v)
            elif is_int[n]:
                is_int[n] = False
            cols[n].append(float(v))
    return {
        n: (np.frombuffer(ints[n], dtype=np.int64).copy() if is_int[n] else np.frombuffer(cols[n], dtype=np.float64).copy())
        for n in names
    }


# ---------------------------------------------------------------- parquet


def _parquet_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetFileError(
            f"the file is not a valid Parquet file, or it is truncated ({_sentence(exc)})", "corrupt"
        ) from None


def _inspect_parquet(path: Path, max_decoded: int) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa

    pf = _parquet_file(path)
    try:
        schema = pf.schema_arrow
        names = list(schema.names)
        _check_entries(len(names), "columns")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DatasetFileError(f"the Parquet file names column {dupes[0]!r} more than once", "bad_header")
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
        rows = pf.metadata.num_rows
        _budget(rows * sum(widths), max_decoded, "the columns")
        if rows == 0:
            raise DatasetFileError("the Parquet file has no rows", "empty")
        stats = [_Stats(f"column {n!r}", lambda i: f"row {i}") for n in names]
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
    except DatasetFileError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetFileError(
            f"the Parquet file is corrupt or truncated ({_sentence(exc)})", "corrupt"
        ) from None
    items = [
        {"name": n, "shape": [rows], "dtype": _arrow_dtype_name(schema.field(n).type), **stats[j].facts()}
        for j, n in enumerate(names)
    ]
    return {"kind": "columns", "rows": rows, "items": items}


def _arrow_dtype_name(t) -> str:
    import pyarrow as pa

    if pa.types.is_boolean(t):
        return "bool"
    name = str(t)
    return {"halffloat": "float16", "float": "float32", "double": "float64"}.get(name, name)


def _read_parquet(path: Path, names: list[str]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=names)
    return {n: table.column(n).to_numpy() for n in names}


# ---------------------------------------------------------------- entry points


def inspect_file(path: str | os.PathLike, fmt: str, *, max_decoded_bytes: int) -> dict[str, Any]:
    """Check a dataset file and describe it, or raise ``DatasetFileError``.

    Returns ``{"kind": "tensors" | "columns", "rows": int | None, "items": [...]}`` with one item
    per tensor or column: ``name``, ``shape``, ``dtype``, and the ``min``, ``max`` and
    ``integer`` (every value a whole number) of its values (``min``/``max`` are None when it is
    empty). Tensors are listed by name; columns in file order, each of shape ``[rows]``.
    """
    path = Path(path)
    inspectors = {
        "safetensors": _inspect_safetensors,
        "npz": _inspect_npz,
        "csv": _inspect_csv,
        "parquet": _inspect_parquet,
    }
    if fmt not in inspectors:
        raise DatasetFileError(f"unknown dataset format {fmt!r}", "unsupported_format")
    return inspectors[fmt](path, max_decoded_bytes)


def read_tensor(path: str | os.PathLike, fmt: str, name: str):
    """One tensor of a safetensors or npz file as a numpy array (``KeyError`` if absent)."""
    path = Path(path)
    if fmt == "safetensors":
        return _read_safetensors(path, name)
    if fmt == "npz":
        return _read_npz(path, name)
    raise ValueError(f"{fmt} files hold columns, not tensors")


def read_columns(path: str | os.PathLike, fmt: str, names: list[str]) -> dict[str, Any]:
    """Columns of a csv or parquet file as 1-D numpy arrays (int64, float or bool)."""
    path = Path(path)
    if fmt == "csv":
        return _read_csv(path, list(names))
    if fmt == "parquet":
        return _read_parquet(path, list(names))
    raise ValueError(f"{fmt} files hold tensors, not columns")
