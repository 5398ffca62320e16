"""The dataset format registry (service/formats/): it covers every format the upload API accepts,
each reader reads back what the format's own library wrote, and each refuses a truncated or
corrupt file with a DatasetFileError of the same code and sentence as before the split."""

from __future__ import annotations

import io
import re
import zipfile
from typing import get_args

import numpy as np
import pytest

from service.dataset_files import COLUMN_FORMATS, TENSOR_FORMATS, DatasetFileError, format_for, inspect_file
from service.formats import BY_SUFFIX, REGISTRY
from service.schemas import DatasetFormat
from tests.helpers.dataset_files import csv_bytes, npz_bytes, parquet_bytes, safetensors_bytes, safetensors_raw

LIMIT = 1 << 30
X = np.array([[1.0, 2.5], [-3.0, 4.0], [0.5, 0.0]], dtype=np.float32)
Y = np.array([0, 1, 1], dtype=np.int64)

# A valid file of every format (written with the format's own library) and the names it holds.
SAMPLES = {
    "safetensors": (lambda: safetensors_bytes({"x": X, "y": Y}), ["x", "y"]),
    "npz": (lambda: npz_bytes(x=X, y=Y), ["x", "y"]),
    "csv": (lambda: csv_bytes(["a", "b", "y"], [[1.0, 2.5, 0], [-3.0, 4.0, 1], [0.5, 0.0, 1]]), ["a", "b", "y"]),
    "parquet": (lambda: parquet_bytes({"a": X[:, 0], "b": X[:, 1], "y": Y}), ["a", "b", "y"]),
}


def write(tmp_path, fmt: str, data: bytes):
    path = tmp_path / f"data{REGISTRY[fmt].suffixes[0]}"
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ coverage


def test_the_registry_holds_every_format_a_dataset_may_have():
    assert list(REGISTRY) == list(get_args(DatasetFormat))
    assert set(SAMPLES) == set(REGISTRY), "every registered format needs a sample file here"
    for name, reader in REGISTRY.items():
        assert reader.name == name
        assert reader.suffixes and all(s.startswith(".") and s == s.lower() for s in reader.suffixes)
    assert TENSOR_FORMATS == ("safetensors", "npz") and COLUMN_FORMATS == ("csv", "parquet")
    assert {n for n, r in REGISTRY.items() if r.holds == "tensors"} == set(TENSOR_FORMATS)
    assert {n for n, r in REGISTRY.items() if r.holds == "columns"} == set(COLUMN_FORMATS)


def test_every_extension_the_upload_route_names_has_a_reader():
    from service.api.routes.datasets import _UPLOAD

    named = re.findall(r"\.[a-z0-9]+", _UPLOAD.extensions)
    assert named == [".safetensors", ".npz", ".csv", ".parquet"]
    assert sorted(named) == sorted(BY_SUFFIX)
    assert _UPLOAD.check_name is format_for
    for suffix in named:
        assert format_for(f"train{suffix}") == BY_SUFFIX[suffix]
        assert format_for(f"TRAIN{suffix.upper()}") == BY_SUFFIX[suffix]
        assert BY_SUFFIX[suffix] in REGISTRY


def test_an_extension_outside_the_registry_is_refused_naming_each_accepted_one():
    for filename, got in (("data.txt", "extension '.txt'"), ("data", "no extension"), ("a.npz.gz", "extension '.gz'")):
        with pytest.raises(DatasetFileError) as exc:
            format_for(filename)
        assert exc.value.code == "unsupported_format"
        assert str(exc.value) == f"{filename!r} has {got}; upload a .safetensors, .npz, .csv or .parquet file"


def test_an_unknown_format_name_is_refused(tmp_path):
    with pytest.raises(DatasetFileError) as exc:
        inspect_file(tmp_path / "x.bin", "hdf5", max_decoded_bytes=LIMIT)
    assert (exc.value.code, str(exc.value)) == ("unsupported_format", "unknown dataset format 'hdf5'")


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_each_format_is_accepted_by_the_upload_api(client, fmt):
    make, names = SAMPLES[fmt]
    suffix = REGISTRY[fmt].suffixes[0]
    r = client.post("/v1/datasets", files={"file": (f"train{suffix}", make(), "application/octet-stream")})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == fmt
    assert sorted(t["name"] for t in body["tensors"] + body["columns"]) == names


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_each_reader_reads_back_what_was_written(tmp_path, fmt):
    make, names = SAMPLES[fmt]
    path = write(tmp_path, fmt, make())
    reader = REGISTRY[fmt]
    facts = reader.inspect(path, LIMIT)
    assert facts["kind"] == reader.holds
    assert [i["name"] for i in facts["items"]] == names
    got = reader.read(path, names)
    if reader.holds == "tensors":
        np.testing.assert_array_equal(got["x"], X)
        np.testing.assert_array_equal(got["y"], Y)
        assert got["x"].dtype == np.float32 and got["y"].dtype == np.int64
    else:
        np.testing.assert_array_equal(np.stack([got["a"], got["b"]], axis=1), X)
        np.testing.assert_array_equal(got["y"], Y)
        assert got["y"].dtype == np.int64
    with pytest.raises(KeyError):  # every format (parquet raised pyarrow's ArrowInvalid: a 500 in the API)
        reader.read(path, ["absent"])


# ------------------------------------------------------------------ truncated and corrupt files


def _st() -> bytes:
    return safetensors_raw([("x", "F32", [2], np.array([1.0, 2.0], "<f4").tobytes())])


def _st_header_len() -> int:
    return int.from_bytes(_st()[:8], "little")


def _npz_member_cut() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(10, dtype=np.int64))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("x.npy", buf.getvalue()[:-8])
    return out.getvalue()


def _parquet() -> bytes:
    return SAMPLES["parquet"][0]()


# (format, what, the file, code, the sentence: exact, or a prefix ending in "...")
BAD_FILES = [
    (
        "safetensors",
        "cut inside the length",
        lambda: _st()[:5],
        "truncated",
        "the safetensors file is truncated: 5 bytes, shorter than its 8-byte header length",
    ),
    (
        "safetensors",
        "cut inside the header",
        lambda: _st()[:20],
        "truncated",
        f"the safetensors file is truncated: its header needs {_st_header_len()} bytes but only 12 follow the length",
    ),
    (
        "safetensors",
        "cut inside the data",
        lambda: _st()[:-3],
        "truncated",
        "the safetensors file is truncated: its header describes 8 bytes of tensor data but only 5 are present",
    ),
    (
        "safetensors",
        "bytes after the data",
        lambda: _st() + b"\0" * 4,
        "corrupt",
        "the safetensors file has 4 bytes after its last tensor: the file is corrupt",
    ),
    (
        "safetensors",
        "a header that is not JSON",
        lambda: _st()[:8] + b"\xff" * (len(_st()) - 8),
        "corrupt",
        "the safetensors header is not valid JSON: the file is corrupt or not safetensors",
    ),
    (
        "npz",
        "cut in half",
        lambda: npz_bytes(x=X)[: len(npz_bytes(x=X)) // 2],
        "corrupt",
        "the npz archive is corrupt or truncated (BadZipFile: File is not a zip file)",
    ),
    (
        "npz",
        "a member cut short",
        _npz_member_cut,
        "truncated",
        "array 'x' is truncated: its header promises 10 values of 8 bytes but the member holds fewer",
    ),
    (
        "npz",
        "a member that is not .npy",
        lambda: npz_bytes(x=X)[:30] + b"\0" * 20,
        "corrupt",
        "the npz archive is corrupt or truncated (...",
    ),
    (
        "csv",
        "cut inside a row",
        lambda: b"a,b\n1,2\n3",
        "ragged_rows",
        "the CSV rows are ragged: line 3 has 1 cell but the header has 2 columns",
    ),
    ("csv", "cut inside a quoted cell", lambda: b'a,b\n1,"2', "corrupt", "the file is not valid CSV: ..."),
    ("csv", "cut after the header", lambda: b"a,b\n", "empty", "the CSV file has a header but no data rows"),
    ("csv", "cut to nothing", lambda: b"", "empty", "the CSV file is empty: it needs a header row of column names"),
    (
        "csv",
        "bytes that are not UTF-8",
        lambda: b"a,b\n1,\xff\xfe\n",
        "corrupt",
        "the CSV file is not UTF-8 text (undecodable byte at position 6); is it really a CSV file?",
    ),
    (
        "parquet",
        "cut before the footer",
        lambda: _parquet()[:-30],
        "corrupt",
        "the file is not a valid Parquet file, or it is truncated (...",
    ),
    (
        "parquet",
        "cut in half",
        lambda: _parquet()[: len(_parquet()) // 2],
        "corrupt",
        "the file is not a valid Parquet file, or it is truncated (...",
    ),
    (
        "parquet",
        "not Parquet at all",
        lambda: b"PAR1" + b"\x07" * 64 + b"PAR1",
        "corrupt",
        "the file is not a valid Parquet file, or it is truncated (...",
    ),
]


def test_every_reader_has_bad_files_here():
    assert {fmt for fmt, *_ in BAD_FILES} == set(REGISTRY)


@pytest.mark.parametrize(
    ("fmt", "what", "make", "code", "sentence"), BAD_FILES, ids=[f"{f}: {w}" for f, w, *_ in BAD_FILES]
)
def test_each_reader_refuses_a_truncated_or_corrupt_file(tmp_path, fmt, what, make, code, sentence):
    path = write(tmp_path, fmt, make())
    for check in (lambda: REGISTRY[fmt].inspect(path, LIMIT), lambda: inspect_file(path, fmt, max_decoded_bytes=LIMIT)):
        with pytest.raises(DatasetFileError) as exc:
            check()
        assert exc.value.code == code, str(exc.value)
        if sentence.endswith("..."):
            assert str(exc.value).startswith(sentence[:-3]), str(exc.value)
        else:
            assert str(exc.value) == sentence
