"""``.safetensors``: parsed here (8-byte header length, JSON header, raw little-endian data).

The header is checked like the reference implementation does (dtypes, shapes, offsets contiguous
and covering the data exactly), so a truncated or padded file is refused. Values are read through
a memory map in chunks; bfloat16 is widened to float32.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.formats.base import CHUNK_BYTES, DatasetFileError, DatasetFormat, Stats, budget, check_entries, where
from service.formats.guards import LimitError, check_json

MAX_HEADER = 100 * 1024 * 1024  # as the reference implementation

# safetensors dtype -> (numpy dtype string, public name)
DTYPES = {
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


# ---------------------------------------------------------------- the header


def _read_header(path: Path, size: int) -> tuple[int, Any]:
    """(length of the JSON header, the parsed header) of the file, whose size is ``size``."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DatasetFileError(
                f"the safetensors file is truncated: {size} bytes, shorter than its 8-byte header length",
                "truncated",
            )
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            raise DatasetFileError(
                f"the safetensors header claims {n} bytes, more than the {MAX_HEADER} "
                "allowed: the file is corrupt or not safetensors",
                "corrupt",
            )
        if 8 + n > size:
            raise DatasetFileError(
                f"the safetensors file is truncated: its header needs {n} bytes but only {size - 8} follow the length",
                "truncated",
            )
        raw = f.read(n)
    try:
        check_json(raw, "the safetensors header")  # before json.loads: no RecursionError, bounded objects
    except LimitError as exc:
        raise DatasetFileError(f"{exc}: the file is corrupt or not safetensors", "corrupt") from None
    try:
        return n, json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DatasetFileError(
            "the safetensors header is not valid JSON: the file is corrupt or not safetensors",
            "corrupt",
        ) from None


def _check_metadata(header: Any) -> None:
    """Drop ``__metadata__`` from the header after checking it (and that the header is an object)."""
    if not isinstance(header, dict):
        raise DatasetFileError("the safetensors header is not a JSON object: the file is corrupt", "corrupt")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise DatasetFileError("the safetensors __metadata__ must map strings to strings", "corrupt")


def _valid_offsets(offsets: Any) -> bool:
    return (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    )


def _entry(name: str, info: Any) -> dict[str, Any]:
    """One checked header entry: name, dtypes, shape, data offsets and value count."""
    what = f"tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise DatasetFileError(f"{what}: the header entry must have exactly dtype, shape and data_offsets", "corrupt")
    st_dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if st_dtype not in DTYPES:
        raise DatasetFileError(
            f"{what} has dtype {st_dtype!r}, which is not supported; use one of " + ", ".join(DTYPES),
            "unsupported_dtype",
        )
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise DatasetFileError(f"{what}: shape must be a list of non-negative integers", "corrupt")
    if not _valid_offsets(offsets):
        raise DatasetFileError(f"{what}: data_offsets must be [begin, end] with begin <= end", "corrupt")
    np_dtype, public = DTYPES[st_dtype]
    itemsize = 1 if st_dtype in ("I8", "U8", "BOOL") else int(np_dtype[2:])
    count = math.prod(shape)
    if offsets[1] - offsets[0] != count * itemsize:
        raise DatasetFileError(
            f"{what}: shape {shape} of {st_dtype} needs {count * itemsize} bytes but its "
            f"data_offsets span {offsets[1] - offsets[0]}: the file is corrupt",
            "corrupt",
        )
    return {
        "name": name,
        "st_dtype": st_dtype,
        "np_dtype": np_dtype,
        "dtype": public,
        "shape": shape,
        "begin": offsets[0],
        "end": offsets[1],
        "count": count,
    }


def _check_back_to_back(entries: list[dict[str, Any]], available: int) -> None:
    """The entries (sorted by offset) must tile the ``available`` bytes of the data buffer exactly."""
    expected = 0
    for e in entries:
        if e["begin"] != expected:
            raise DatasetFileError(
                f"tensor {e['name']!r}: its data starts at byte {e['begin']} of the data buffer, "
                f"expected {expected} (tensors must be stored back to back): the file is corrupt",
                "corrupt",
            )
        expected = e["end"]
    if expected > available:
        raise DatasetFileError(
            f"the safetensors file is truncated: its header describes {expected} bytes of tensor "
            f"data but only {available} are present",
            "truncated",
        )
    if expected < available:
        raise DatasetFileError(
            f"the safetensors file has {available - expected} bytes after its last tensor: the file is corrupt",
            "corrupt",
        )


def layout(path: Path) -> tuple[int, list[dict[str, Any]]]:
    """(offset of the data buffer, entries sorted by offset) of a checked safetensors file."""
    size = path.stat().st_size
    n, header = _read_header(path, size)
    _check_metadata(header)
    check_entries(len(header), "tensors")
    entries = [_entry(name, info) for name, info in header.items()]
    entries.sort(key=lambda e: (e["begin"], e["end"]))
    _check_back_to_back(entries, size - 8 - n)
    return 8 + n, entries


# ---------------------------------------------------------------- values


def _bf16_to_f32(raw):
    import numpy as np

    return (raw.astype(np.uint32) << 16).view(np.float32)


def _chunks(path: Path, start: int, e: dict[str, Any]) -> Iterator[Any]:
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


def inspect(path: Path, max_decoded: int) -> dict[str, Any]:
    start, entries = layout(path)
    budget(sum(e["end"] - e["begin"] for e in entries), max_decoded, "the tensors")
    items = []
    for e in sorted(entries, key=lambda e: e["name"]):
        shape = tuple(e["shape"])
        stats = Stats(f"tensor {e['name']!r}", functools.partial(where, shape))
        for chunk in _chunks(path, start, e):
            stats.update(chunk)
        items.append({"name": e["name"], "shape": list(shape), "dtype": e["dtype"], **stats.facts()})
    return {"kind": "tensors", "rows": None, "items": items}


def _read_one(path: Path, start: int, e: dict[str, Any]):
    import numpy as np

    with open(path, "rb") as f:
        f.seek(start + e["begin"])
        flat = np.fromfile(f, dtype=np.dtype(e["np_dtype"]), count=e["count"])
    if flat.size != e["count"]:
        raise DatasetFileError(f"tensor {e['name']!r} is truncated", "truncated")
    if e["st_dtype"] == "BF16":
        flat = _bf16_to_f32(flat)
    return flat.reshape(e["shape"])


def read(path: Path, names: list[str]) -> dict[str, Any]:
    start, entries = layout(path)
    by_name = {e["name"]: e for e in entries}
    out = {}
    for name in names:
        if name not in by_name:
            raise KeyError(name)
        out[name] = _read_one(path, start, by_name[name])
    return out


FORMAT = DatasetFormat(name="safetensors", suffixes=(".safetensors",), holds="tensors", inspect=inspect, read=read)
