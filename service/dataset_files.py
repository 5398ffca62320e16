"""Dataset files: check an uploaded file and describe it, and read arrays back out of it.

Four formats, chosen by the file's extension, each one module of ``service/formats/`` behind the
registry there (``service.formats.REGISTRY``):

* ``.safetensors`` (formats/safetensors.py): parsed here (8-byte header length, JSON header, raw
  little-endian data); the header is checked like the reference implementation does (dtypes,
  shapes, offsets contiguous and covering the data exactly), so a truncated or padded file is refused.
* ``.npz`` (formats/npz.py): a zip of ``.npy`` members. Each member's header is read with numpy's
  own header parser; a member whose dtype holds Python objects (which only pickle could load) is
  refused before any of its data is read, and readers use ``numpy.load(allow_pickle=False)``.
* ``.csv`` (formats/csv.py): UTF-8, comma-separated, a header row of column names, then numbers only.
* ``.parquet`` (formats/parquet.py): columns of integer, floating or boolean type only, no nulls.

Nothing here trusts the file: no pickle, no code, no network. Values are read in chunks so
checking a file holds little memory whatever its size, and every problem raises
``DatasetFileError`` with a sentence naming the tensor or column (and row) and the reason.

numpy and pyarrow are imported inside the functions that need them, so that importing this
module (the API does) stays light.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from service.formats import BY_SUFFIX, REGISTRY, DatasetFileError, DatasetFormat
from service.formats.base import CHUNK_BYTES, MAX_ENTRIES
from service.formats.safetensors import MAX_HEADER as MAX_SAFETENSORS_HEADER

__all__ = [
    "CHUNK_BYTES",
    "COLUMN_FORMATS",
    "FORMATS",
    "MAX_ENTRIES",
    "MAX_SAFETENSORS_HEADER",
    "TENSOR_FORMATS",
    "DatasetFileError",
    "format_for",
    "inspect_file",
    "read_columns",
    "read_tensor",
]

FORMATS = dict(BY_SUFFIX)  # extension -> format name
TENSOR_FORMATS = tuple(name for name, f in REGISTRY.items() if f.holds == "tensors")
COLUMN_FORMATS = tuple(name for name, f in REGISTRY.items() if f.holds == "columns")


def _in_words(suffixes: list[str]) -> str:
    return suffixes[0] if len(suffixes) == 1 else ", ".join(suffixes[:-1]) + " or " + suffixes[-1]


def format_for(filename: str) -> str:
    """The format named by the file's extension, or ``DatasetFileError``."""
    suffix = Path(filename).suffix.lower()
    if suffix in FORMATS:
        return FORMATS[suffix]
    got = f"extension {suffix!r}" if suffix else "no extension"
    raise DatasetFileError(
        f"{filename!r} has {got}; upload a {_in_words(list(FORMATS))} file",
        "unsupported_format",
    )


def inspect_file(path: str | os.PathLike, fmt: str, *, max_decoded_bytes: int) -> dict[str, Any]:
    """Check a dataset file and describe it, or raise ``DatasetFileError``.

    Returns ``{"kind": "tensors" | "columns", "rows": int | None, "items": [...]}`` with one item
    per tensor or column: ``name``, ``shape``, ``dtype``, and the ``min``, ``max`` and
    ``integer`` (every value a whole number) of its values (``min``/``max`` are None when it is
    empty). Tensors are listed by name; columns in file order, each of shape ``[rows]``.
    """
    reader = REGISTRY.get(fmt)
    if reader is None:
        raise DatasetFileError(f"unknown dataset format {fmt!r}", "unsupported_format")
    return reader.inspect(Path(path), max_decoded_bytes)


def _reader(fmt: str, holds: str, other: str) -> DatasetFormat:
    reader = REGISTRY.get(fmt)
    if reader is None or reader.holds != holds:
        raise ValueError(f"{fmt} files hold {other}, not {holds}")
    return reader


def read_tensor(path: str | os.PathLike, fmt: str, name: str):
    """One tensor of a safetensors or npz file as a numpy array (``KeyError`` if absent)."""
    return _reader(fmt, "tensors", "columns").read(Path(path), [name])[name]


def read_columns(path: str | os.PathLike, fmt: str, names: list[str]) -> dict[str, Any]:
    """Columns of a csv or parquet file as 1-D numpy arrays (int64, float or bool)."""
    return _reader(fmt, "columns", "tensors").read(Path(path), list(names))
