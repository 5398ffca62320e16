"""What every dataset format shares: the error, the reader record, limits and running statistics.

A format is one ``DatasetFormat``: its ``name`` (the value stored in the database), the file
``suffixes`` that select it, what it ``holds`` (named ``"tensors"`` or ``"columns"``), and two
functions: ``inspect(path, max_decoded)`` checks a whole file and describes it (or raises
``DatasetFileError``), ``read(path, names)`` returns the named tensors or columns as numpy arrays
(``KeyError`` for a name the file lacks, whatever the format; jobs are checked against the file's
recorded names before anything reads it).

numpy is imported inside the functions that need it, so importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MAX_ENTRIES = 4096  # tensors or columns per file
CHUNK_BYTES = 16 * 1024 * 1024  # values checked per step


class DatasetFileError(ValueError):
    """A file that cannot be accepted. ``str(exc)`` is a sentence for the client; ``code`` a short type."""

    def __init__(self, message: str, code: str = "invalid_file") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset format: how a file is recognised, checked and read."""

    name: str
    suffixes: tuple[str, ...]  # lower case, with the dot
    holds: Literal["tensors", "columns"]
    # (path, max_decoded_bytes) -> {"kind", "rows", "items"}; DatasetFileError when refused
    inspect: Callable[[Path, int], dict[str, Any]]
    # (path, names) -> {name: numpy array}; KeyError for a name the file lacks
    read: Callable[[Path, list[str]], dict[str, Any]]


# ---------------------------------------------------------------- shared checks and words


def check_entries(count: int, kind: str) -> None:
    if count > MAX_ENTRIES:
        raise DatasetFileError(f"the file has {count} {kind}; at most {MAX_ENTRIES} are accepted", "too_many_entries")


def budget(need: int, limit: int, what: str) -> None:
    if need > limit:
        raise DatasetFileError(
            f"{what} hold {need} bytes once decoded, above the limit of {limit} bytes (GRADTUNE_MAX_DATASET_BYTES)",
            "too_large",
        )


def sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def non_finite_word(value: float) -> str:
    """How a message names a non-finite value."""
    return "NaN" if value != value else ("-infinity" if value < 0 else "infinity")


def duplicate(names: list[str]) -> str | None:
    """The first (sorted) name that occurs more than once, or None (linear in the number of names)."""
    seen: set[str] = set()
    dupes: set[str] = set()
    for n in names:
        (dupes if n in seen else seen).add(n)
    return min(dupes) if dupes else None


def where(shape: tuple[int, ...], flat: int, fortran: bool = False) -> str:
    """The position of the ``flat``-th value of an array of ``shape`` in words."""
    import numpy as np

    if len(shape) <= 1:
        return f"index {flat}"
    idx = np.unravel_index(flat, shape, order="F" if fortran else "C")
    return "index [" + ", ".join(str(int(i)) for i in idx) + "]"


# ---------------------------------------------------------------- statistics


class Stats:
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
        """A chunk of values (a numpy array of any numeric dtype)."""
        import numpy as np

        n = int(values.size)
        if n == 0:
            return
        if values.dtype.kind == "b":
            values = values.astype(np.uint8)
        if values.dtype.kind == "f":
            self._check_finite(values)
            if self.integer:
                self.integer = bool(np.all(values == np.floor(values)))
            lo, hi = float(values.min()), float(values.max())
        else:
            lo, hi = int(values.min()), int(values.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        self.seen += n

    def _check_finite(self, values) -> None:
        import numpy as np

        finite = np.isfinite(values)
        if finite.all():
            return
        first = int(np.argmin(finite))
        count = int(values.size) - int(np.count_nonzero(finite))
        more = " (and other non-finite values)" if count > 1 else ""
        raise DatasetFileError(
            f"{self.what} contains {non_finite_word(values[first])} at {self.locate(self.seen + first)}{more}; "
            "NaN and infinity are not allowed in datasets",
            "non_finite",
        )

    def add(self, value: float | int) -> None:
        """One value (CSV); the caller has checked it is finite."""
        if self.integer and isinstance(value, float) and not value.is_integer():
            self.integer = False
        self.min = value if self.min is None or value < self.min else self.min
        self.max = value if self.max is None or value > self.max else self.max
        self.seen += 1

    def facts(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "integer": self.integer}
