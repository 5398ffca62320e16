"""``.npz``: a zip of ``.npy`` members.

Each member's header is read with numpy's own (literal-only) header parser; a member whose dtype
holds Python objects (which only pickle could load) is refused before any of its data is read,
and readers use ``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from service.formats.base import (
    CHUNK_BYTES,
    MAX_ENTRIES,
    DatasetFileError,
    DatasetFormat,
    Stats,
    budget,
    check_entries,
    sentence,
    where,
)
from service.formats.guards import ZIP_ERRORS, LimitError, zip_directory

MAX_NPY_HEADER = 10_000  # bytes: numpy's own limit for headers it parses safely (max_header_size)


def _header_bytes(fp, member: str) -> bytes:
    """The magic, length and header of a .npy stream, the length checked before the header is read.

    numpy reads a header of any declared length (version 2 allows 4 GiB) before checking it
    against its ``max_header_size``; this reads at most ``MAX_NPY_HEADER`` bytes.
    """
    magic = fp.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
        return magic  # numpy's read_magic names what is wrong
    size = fp.read(2 if magic[6] == 1 else 4)
    length = int.from_bytes(size, "little")
    if length > MAX_NPY_HEADER:
        raise DatasetFileError(
            f"member {member!r} declares a {length}-byte .npy header, above the limit of {MAX_NPY_HEADER} "
            "bytes: the file is corrupt",
            "corrupt",
        )
    return magic + size + fp.read(length)


def _npy_header(fp, member: str):
    """(shape, fortran_order, dtype) of a .npy stream, with numpy's own (literal-only) parser."""
    import io

    import numpy as np
    from numpy.lib import format as npy

    try:
        head = io.BytesIO(_header_bytes(fp, member))
        version = npy.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(head)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except DatasetFileError:
        raise
    except Exception as exc:  # numpy's parser raises ValueError, SyntaxError, RecursionError, ...
        raise DatasetFileError(
            f"member {member!r} is not a valid .npy array ({sentence(exc)}): the file is corrupt",
            "corrupt",
        ) from None
    if any(d < 0 for d in shape):
        raise DatasetFileError(
            f"member {member!r} declares shape {tuple(shape)}, with a negative dimension: the file is corrupt",
            "corrupt",
        )
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


def check_numeric_dtype(dtype, what: str) -> None:
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


def _members(zf) -> list[tuple[str, Any]]:
    """(array name, zip entry) of every member, sorted by name."""
    seen: dict[str, Any] = {}
    for info in zf.infolist():
        if info.is_dir():
            continue
        if not info.filename.endswith(".npy"):
            raise DatasetFileError(f"member {info.filename!r} of the npz archive is not a .npy array", "corrupt")
        name = info.filename[:-4]
        if name in seen:
            raise DatasetFileError(f"the npz archive holds array {name!r} twice", "corrupt")
        seen[name] = info
    check_entries(len(seen), "arrays")
    return sorted(seen.items())


def _feed_values(fp, stats: Stats, dtype, count: int, what: str) -> None:
    """Read the ``count`` values of an open member in chunks into ``stats``."""
    import numpy as np

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


def _inspect_members(zf, max_decoded: int) -> list[dict[str, Any]]:
    items = []
    decoded = 0
    for name, info in _members(zf):
        what = f"array {name!r}"
        with zf.open(info) as fp:
            shape, fortran, dtype = _npy_header(fp, info.filename)
            check_numeric_dtype(dtype, what)
            count = math.prod(shape)
            decoded += count * dtype.itemsize
            budget(decoded, max_decoded, "the arrays")
            stats = Stats(what, functools.partial(where, shape, fortran=fortran))
            _feed_values(fp, stats, dtype, count, what)
            items.append({"name": name, "shape": list(shape), "dtype": dtype.name, **stats.facts()})
    return items


def inspect(path: Path, max_decoded: int) -> dict[str, Any]:
    import zipfile

    try:
        zip_directory(path, MAX_ENTRIES, "the npz archive")  # before ZipFile() builds a record per entry
        with zipfile.ZipFile(path) as zf:
            items = _inspect_members(zf, max_decoded)
    except DatasetFileError:
        raise
    except LimitError as exc:
        raise DatasetFileError(str(exc), exc.code) from None
    except ZIP_ERRORS as exc:
        raise DatasetFileError(f"the npz archive is corrupt or truncated ({sentence(exc)})", "corrupt") from None
    return {"kind": "tensors", "rows": None, "items": items}


def read(path: Path, names: list[str]) -> dict[str, Any]:
    import numpy as np

    out = {}
    with np.load(path, allow_pickle=False) as z:
        for name in names:
            if name not in z.files:
                raise KeyError(name)
            out[name] = z[name]
    return out


FORMAT = DatasetFormat(name="npz", suffixes=(".npz",), holds="tensors", inspect=inspect, read=read)
