"""Property tests of every dataset reader (hypothesis; issue 10): arbitrary bytes and mutated valid
files never raise anything but ``DatasetFileError``; what a reader accepts it reads back as it
described it; and valid files, written by each format's own library from generated arrays, are
described and read back exactly.

Seeded (``derandomize``), no example database, no deadline: the same examples on every run.
``pytest --hypothesis-show-statistics`` prints how many each test ran.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.formats import REGISTRY, DatasetFileError
from tests.helpers.dataset_files import csv_bytes, npz_bytes, parquet_bytes, safetensors_bytes
from tests.helpers.properties import FUZZ, ROUND_TRIP

LIMIT = 1 << 30

_DIR = Path(tempfile.mkdtemp(prefix="gradtune-properties-"))


def _file(fmt: str, data: bytes) -> Path:
    path = _DIR / f"example{REGISTRY[fmt].suffixes[0]}"
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ generated valid contents

_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32, "uint8": np.uint8}


@st.composite
def arrays(draw, max_dims: int = 3, min_side: int = 0):
    dtype = np.dtype(draw(st.sampled_from(sorted(_DTYPES))))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=min_side, max_side=6))
    if dtype.kind == "f":
        elements = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8)
    else:
        info = np.iinfo(dtype)
        elements = st.integers(max(info.min, -(10**9)), min(info.max, 10**9))
    return draw(hnp.arrays(dtype, shape, elements=elements))


names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@st.composite
def tensor_files(draw):
    """(format, bytes, {name: array}) of a valid safetensors or npz file."""
    fmt = draw(st.sampled_from(["safetensors", "npz"]))
    tensors = draw(st.dictionaries(names, arrays(), min_size=1, max_size=4))
    if fmt == "safetensors":
        return fmt, safetensors_bytes(tensors), tensors
    return fmt, npz_bytes(compressed=draw(st.booleans()), **tensors), tensors


@st.composite
def column_files(draw):
    """(format, bytes, {name: 1-D array}) of a valid csv or parquet file."""
    fmt = draw(st.sampled_from(["csv", "parquet"]))
    rows = draw(st.integers(1, 20))
    cols = draw(st.lists(names, min_size=1, max_size=5, unique=True))
    data = {}
    for c in cols:
        if draw(st.booleans()):
            data[c] = np.array(draw(st.lists(st.integers(-(10**12), 10**12), min_size=rows, max_size=rows)), np.int64)
        else:
            values = st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False).map(lambda v: v + 0.5)
            data[c] = np.array(draw(st.lists(values, min_size=rows, max_size=rows)), np.float64)
    if fmt == "csv":
        return fmt, csv_bytes(cols, [[repr(data[c][i].item()) for c in cols] for i in range(rows)]), data
    return fmt, parquet_bytes(data), data


@st.composite
def mutated(draw, files):
    """A valid file with a few bytes flipped, cut, inserted or deleted."""
    fmt, data, _contents = draw(files)
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "set"]))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[at] = draw(st.sampled_from([0, 0xFF, ord("-"), ord("["), ord("9"), ord(","), ord('"')]))
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 16))]
    return fmt, bytes(out)


# ------------------------------------------------------------------ properties


def _described_as_read(fmt: str, path: Path, facts: dict) -> None:
    """What ``inspect`` accepted, ``read`` reads back as it was described."""
    reader = REGISTRY[fmt]
    items = {i["name"]: i for i in facts["items"]}
    got = reader.read(path, list(items))
    for name, item in items.items():
        a = got[name]
        assert list(a.shape) == item["shape"], (name, a.shape, item)
        if a.size:
            assert float(a.min()) == pytest.approx(float(item["min"])) and float(a.max()) == pytest.approx(
                float(item["max"])
            )
    with pytest.raises(KeyError):
        reader.read(path, ["\0absent"])


def _inspect_or_refuse(fmt: str, data: bytes) -> None:
    path = _file(fmt, data)
    try:
        facts = REGISTRY[fmt].inspect(path, LIMIT)
    except DatasetFileError as exc:
        assert str(exc) and exc.code
        event(f"{fmt}: refused ({exc.code})")
        return
    event(f"{fmt}: accepted")
    _described_as_read(fmt, path, facts)


@FUZZ
@given(fmt=st.sampled_from(sorted(REGISTRY)), data=st.binary(max_size=2048))
def test_arbitrary_bytes_are_refused_with_a_dataset_file_error_or_read_as_described(fmt, data):
    _inspect_or_refuse(fmt, data)


@FUZZ
@given(
    fmt=st.sampled_from(sorted(REGISTRY)),
    head=st.sampled_from([b"PK\x03\x04", b"PAR1", b"\x93NUMPY", b"a,b\n"]),
    data=st.binary(max_size=512),
)
def test_bytes_that_start_like_a_format_are_refused_or_read_as_described(fmt, head, data):
    _inspect_or_refuse(fmt, head + data + (b"PAR1" if head == b"PAR1" else b""))


@FUZZ
@given(mutated(tensor_files()))
def test_mutated_tensor_files_are_refused_or_read_as_described(case):
    _inspect_or_refuse(*case)


@FUZZ
@given(mutated(column_files()))
def test_mutated_column_files_are_refused_or_read_as_described(case):
    _inspect_or_refuse(*case)


@ROUND_TRIP
@given(tensor_files())
def test_valid_tensor_files_round_trip(case):
    fmt, data, tensors = case
    path = _file(fmt, data)
    facts = REGISTRY[fmt].inspect(path, LIMIT)
    assert [i["name"] for i in facts["items"]] == sorted(tensors)
    got = REGISTRY[fmt].read(path, list(tensors))
    for name, want in tensors.items():
        item = next(i for i in facts["items"] if i["name"] == name)
        assert item["shape"] == list(want.shape) and item["dtype"] == want.dtype.name
        np.testing.assert_array_equal(got[name], want)
        assert got[name].dtype == want.dtype
        if want.size:
            assert (item["min"], item["max"]) == (want.min().item(), want.max().item())
            assert item["integer"] == bool(np.all(want == np.floor(want)))
        else:
            assert item["min"] is None and item["max"] is None


@ROUND_TRIP
@given(column_files())
def test_valid_column_files_round_trip(case):
    fmt, data, columns = case
    path = _file(fmt, data)
    facts = REGISTRY[fmt].inspect(path, LIMIT)
    rows = len(next(iter(columns.values())))
    assert facts["rows"] == rows and [i["name"] for i in facts["items"]] == list(columns)
    got = REGISTRY[fmt].read(path, list(columns))
    for item in facts["items"]:
        want = columns[item["name"]]
        np.testing.assert_array_equal(got[item["name"]], want)
        assert item["dtype"] == want.dtype.name and item["shape"] == [rows]
        assert (item["min"], item["max"]) == (want.min().item(), want.max().item())
