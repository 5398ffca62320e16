"""The datasets resource on a real database (SQLite and PostgreSQL) and the local artifact store:
every upload format, every refused file (with nothing left behind), deletion, and jobs that
name datasets."""

from __future__ import annotations

import hashlib
import math
import uuid
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from sqlalchemy import func, select

from service.db.models import Dataset, Job, JobDataset, utcnow
from service.main import create_app
from service.schemas import DatasetPublic, JobCreate
from service.validation import check_job
from tests.helpers.dataset_files import blobs, csv_bytes, npz_bytes, parquet_bytes, safetensors_bytes, safetensors_raw
from tests.helpers.support import keyed_client, stored_files, temp_files
from tests.service.conftest import count_jobs, job_body


def upload(client, filename: str, data: bytes, field: str = "file"):
    return client.post("/v1/datasets", files={field: (filename, data, "application/octet-stream")})


def uploaded(client, filename: str, data: bytes) -> dict:
    r = upload(client, filename, data)
    assert r.status_code == 201, r.text
    return r.json()


def count_datasets(app) -> int:
    with app.state.sessionmaker() as s:
        return s.scalar(select(func.count()).select_from(Dataset))


@pytest.fixture
def nothing_stored(app):
    """Call after a refused upload: no row, no stored object, no temporary file."""

    def check() -> None:
        assert count_datasets(app) == 0, "a refused upload stored a dataset row"
        assert stored_files(app) == [], "a refused upload left an object in the artifact store"
        assert temp_files(app) == [], "a refused upload left a temporary file"

    return check


def refused(r, status: int, *words: str, type_: str | None = None) -> str:
    """Assert a refusal: status, and a message naming each of ``words``; returns the message."""
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    if isinstance(detail, list):
        assert len(detail) == 1, detail
        assert detail[0]["loc"] == ["body", "file"] and detail[0]["field"] == "file"
        if type_:
            assert detail[0]["type"] == type_, detail
        msg = detail[0]["msg"]
    else:
        msg = detail
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"
    assert "Traceback" not in r.text
    return msg


def item(body: dict, name: str) -> dict:
    found = [t for t in body["tensors"] + body["columns"] if t["name"] == name]
    assert len(found) == 1, body
    return found[0]


# ------------------------------------------------------------------ formats round trip


def test_safetensors_round_trip(client, app):
    x, y = blobs(12, 3)
    data = safetensors_bytes({"x": x, "y": y, "w": np.array([[1.5, -2.0]], dtype=np.float64)})
    r = upload(client, "train.safetensors", data)
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"/v1/datasets/{body['id']}"
    assert uuid.UUID(body["id"]).version == 4
    assert body["filename"] == "train.safetensors" and body["format"] == "safetensors"
    assert body["sha256"] == hashlib.sha256(data).hexdigest() and body["size"] == len(data)
    assert body["rows"] is None and body["columns"] == []
    created = datetime.fromisoformat(body["created_at"].replace("Z", "+00:00"))
    assert abs(created - utcnow()) < timedelta(minutes=1)
    assert [t["name"] for t in body["tensors"]] == ["w", "x", "y"]
    assert item(body, "x") == {
        "name": "x",
        "shape": [12, 3],
        "dtype": "float32",
        "min": pytest.approx(float(x.min())),
        "max": pytest.approx(float(x.max())),
        "integer": False,
    }
    assert item(body, "y") == {"name": "y", "shape": [12], "dtype": "int64", "min": 0, "max": 2, "integer": True}
    assert item(body, "w") == {
        "name": "w",
        "shape": [1, 2],
        "dtype": "float64",
        "min": -2.0,
        "max": 1.5,
        "integer": False,
    }
    # stored under its sha256, byte for byte; GET answers the same description
    assert app.state.store.exists(body["sha256"])
    assert app.state.store.local_path(body["sha256"]).read_bytes() == data
    got = client.get(f"/v1/datasets/{body['id']}")
    assert got.status_code == 200 and got.json() == body


def test_safetensors_bfloat16_float16_and_bool(client):
    bf16 = (np.array([1.0, -2.5, 3.0], dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    data = safetensors_raw(
        [
            ("h", "F16", [3], np.array([0.5, 1, 2], dtype="<f2").tobytes()),
            ("b", "BF16", [3], bf16),
            ("m", "BOOL", [2, 2], np.array([1, 0, 1, 1], dtype=np.uint8).tobytes()),
            ("e", "F32", [0, 4], b""),
        ]
    )
    body = uploaded(client, "mixed.safetensors", data)
    assert item(body, "b") == {
        "name": "b",
        "shape": [3],
        "dtype": "bfloat16",
        "min": -2.5,
        "max": 3.0,
        "integer": False,
    }
    assert item(body, "h") == {"name": "h", "shape": [3], "dtype": "float16", "min": 0.5, "max": 2.0, "integer": False}
    assert item(body, "m") == {"name": "m", "shape": [2, 2], "dtype": "bool", "min": 0, "max": 1, "integer": True}
    assert item(body, "e") == {
        "name": "e",
        "shape": [0, 4],
        "dtype": "float32",
        "min": None,
        "max": None,
        "integer": True,
    }


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_npz_round_trip(client, app, compressed):
    x = np.arange(10, dtype=np.float64).reshape(5, 2) / 4
    labels = np.array([3, 1, 4, 1, 5], dtype=np.int32)
    data = npz_bytes(compressed, features=x, labels=labels, big=np.asfortranarray(np.ones((3, 4), ">f4")))
    body = uploaded(client, "d.npz", data)
    assert body["format"] == "npz" and body["sha256"] == hashlib.sha256(data).hexdigest()
    assert item(body, "features") == {
        "name": "features",
        "shape": [5, 2],
        "dtype": "float64",
        "min": 0.0,
        "max": 2.25,
        "integer": False,
    }
    assert item(body, "labels") == {
        "name": "labels",
        "shape": [5],
        "dtype": "int32",
        "min": 1,
        "max": 5,
        "integer": True,
    }
    assert item(body, "big") == {
        "name": "big",
        "shape": [3, 4],
        "dtype": "float32",
        "min": 1.0,
        "max": 1.0,
        "integer": True,
    }
    assert len(stored_files(app)) == 1


def test_csv_round_trip(client):
    data = csv_bytes(["a", " b ", "label"], [[1, 0.5, 0], [2, -1.25, 1], [3, 1e3, 2], [4, 2, 1]])
    body = uploaded(client, "table.CSV", data)
    assert body["format"] == "csv" and body["rows"] == 4 and body["tensors"] == []
    assert body["columns"] == [
        {"name": "a", "shape": [4], "dtype": "int64", "min": 1, "max": 4, "integer": True},
        {"name": "b", "shape": [4], "dtype": "float64", "min": -1.25, "max": 1000.0, "integer": False},
        {"name": "label", "shape": [4], "dtype": "int64", "min": 0, "max": 2, "integer": True},
    ]


def test_parquet_round_trip(client):
    data = parquet_bytes(
        {
            "f32": pa.array([0.5, 1.5, -3.0], pa.float32()),
            "i16": pa.array([7, -2, 0], pa.int16()),
            "flag": pa.array([True, False, True]),
            "whole": pa.array([1.0, 2.0, 3.0], pa.float64()),
        }
    )
    body = uploaded(client, "cols.parquet", data)
    assert body["format"] == "parquet" and body["rows"] == 3
    assert body["columns"] == [
        {"name": "f32", "shape": [3], "dtype": "float32", "min": -3.0, "max": 1.5, "integer": False},
        {"name": "i16", "shape": [3], "dtype": "int16", "min": -2, "max": 7, "integer": True},
        {"name": "flag", "shape": [3], "dtype": "bool", "min": 0, "max": 1, "integer": True},
        {"name": "whole", "shape": [3], "dtype": "float64", "min": 1.0, "max": 3.0, "integer": True},
    ]


def test_same_bytes_twice_are_one_dataset_and_one_object(client, app):
    data = npz_bytes(x=np.ones((4, 2)), y=np.arange(4))
    first = upload(client, "a.npz", data)
    again = upload(client, "renamed.npz", data)
    assert first.status_code == 201 and again.status_code == 200, again.text
    assert again.json() == first.json()  # same id, sha256, and the first upload's filename
    assert again.headers["location"] == f"/v1/datasets/{first.json()['id']}"
    assert count_datasets(app) == 1 and len(stored_files(app)) == 1
    assert temp_files(app) == []
    other = uploaded(client, "b.npz", npz_bytes(x=np.ones((4, 2)), y=np.arange(4) + 1))
    assert other["id"] != first.json()["id"] and other["sha256"] != first.json()["sha256"]
    assert count_datasets(app) == 2 and len(stored_files(app)) == 2


def test_same_bytes_restore_a_lost_object(client, app):
    data = csv_bytes(["a", "b"], [[1, 2], [3, 4]])
    body = uploaded(client, "t.csv", data)
    app.state.store.delete(body["sha256"])
    assert upload(client, "t.csv", data).status_code == 200
    assert app.state.store.local_path(body["sha256"]).read_bytes() == data


# ------------------------------------------------------------------ refused files


def test_pickle_inside_npz_is_refused(client, nothing_stored):
    data = npz_bytes(x=np.ones((2, 2)), evil=np.array([{"a": 1}, None], dtype=object))
    msg = refused(upload(client, "evil.npz", data), 422, "evil.npz", "'evil'", "pickle", type_="pickle_not_allowed")
    assert "never allowed" in msg
    nothing_stored()


def test_non_numeric_npz_array_is_refused(client, nothing_stored):
    data = npz_bytes(x=np.ones((2, 2)), names=np.array(["a", "b"]))
    refused(upload(client, "s.npz", data), 422, "'names'", "not numeric", type_="non_numeric")
    nothing_stored()


def test_truncated_safetensors_is_refused(client, nothing_stored):
    data = safetensors_bytes({"x": np.ones((10, 4), np.float32)})
    refused(upload(client, "t.safetensors", data[:-7]), 422, "t.safetensors", "truncated", type_="truncated")
    refused(upload(client, "t.safetensors", data[:5]), 422, "truncated")
    refused(upload(client, "t.safetensors", data[:20]), 422, "truncated")
    nothing_stored()


def test_corrupt_safetensors_is_refused(client, nothing_stored):
    good = safetensors_bytes({"x": np.ones((2, 2), np.float32)})
    refused(upload(client, "c.safetensors", good + b"\0" * 8), 422, "after its last tensor", type_="corrupt")
    n = int.from_bytes(good[:8], "little")
    garbage = good[:8] + b"{" + b"x" * (n - 1) + good[8 + n :]
    refused(upload(client, "c.safetensors", garbage), 422, "not valid JSON", type_="corrupt")
    refused(upload(client, "c.safetensors", b"\xff" * 64), 422, "corrupt")
    lying = safetensors_raw([("x", "F32", [4], b"\0" * 8)])
    refused(upload(client, "c.safetensors", lying), 422, "'x'", "needs 16 bytes", type_="corrupt")
    f8 = safetensors_raw([("x", "F8_E4M3", [4], b"\0" * 4)])
    refused(upload(client, "c.safetensors", f8), 422, "'x'", "F8_E4M3", type_="unsupported_dtype")
    nothing_stored()


def test_corrupt_or_truncated_npz_is_refused(client, nothing_stored):
    data = npz_bytes(x=np.arange(1000.0).reshape(100, 10))
    refused(upload(client, "c.npz", b"PK\x03\x04" + b"\x00" * 100), 422, "c.npz", "corrupt", type_="corrupt")
    refused(upload(client, "c.npz", data[: len(data) // 2]), 422, "corrupt")
    refused(upload(client, "c.npz", b"x,y\n1,2\n"), 422, "npz")
    nothing_stored()


def test_corrupt_or_truncated_parquet_is_refused(client, nothing_stored):
    data = parquet_bytes({"a": pa.array(np.arange(100.0))})
    refused(upload(client, "c.parquet", data[: len(data) - 30]), 422, "c.parquet", "Parquet", type_="corrupt")
    refused(upload(client, "c.parquet", b"not parquet at all"), 422, "not a valid Parquet file")
    nothing_stored()


def test_parquet_non_numeric_and_null_columns_are_refused(client, nothing_stored):
    strings = parquet_bytes({"a": pa.array([1.0, 2.0]), "name": pa.array(["x", "y"])})
    refused(upload(client, "s.parquet", strings), 422, "column 'name'", "not numeric", type_="non_numeric")
    nulls = parquet_bytes({"a": pa.array([1.0, None, 3.0])})
    refused(upload(client, "n.parquet", nulls), 422, "column 'a'", "missing values", "row 1", type_="missing_values")
    nothing_stored()


@pytest.mark.parametrize("filename", ["data.txt", "data.pkl", "data.npy", "data", "data.csv.gz"])
def test_wrong_extension_is_refused(client, nothing_stored, filename):
    r = upload(client, filename, csv_bytes(["a"], [[1]]))
    refused(r, 422, repr(filename), ".safetensors, .npz, .csv or .parquet", type_="unsupported_format")
    nothing_stored()


def test_ragged_csv_rows_are_refused(client, nothing_stored):
    data = b"a,b,c\n1,2,3\n4,5\n"
    refused(
        upload(client, "r.csv", data), 422, "r.csv", "ragged", "line 3", "2 cells", "3 columns", type_="ragged_rows"
    )
    refused(upload(client, "r.csv", b"a,b\n1,2\n3,4,5\n"), 422, "line 3 has 3 cells")
    nothing_stored()


def test_non_numeric_csv_cells_are_refused(client, nothing_stored):
    data = b"x1,x2,label\n1,2,0\n3,four,1\n"
    refused(upload(client, "n.csv", data), 422, "column 'x2'", "line 3", "'four'", "not a number", type_="non_numeric")
    refused(upload(client, "e.csv", b"a,b\n1,\n"), 422, "column 'b'", "line 2", "empty", type_="non_numeric")
    refused(upload(client, "h.csv", b"1,2\n3,4\n"), 422, "header", type_="bad_header")
    refused(upload(client, "d.csv", b"a,a\n1,2\n"), 422, "'a' more than once", type_="bad_header")
    refused(upload(client, "z.csv", b"a,b\n"), 422, "no data rows", type_="empty")
    refused(upload(client, "z.csv", b""), 422, "empty", type_="empty")
    refused(upload(client, "u.csv", b"a,b\n1,\xff\xfe\n"), 422, "not UTF-8", type_="corrupt")
    nothing_stored()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_is_refused_in_every_format(client, nothing_stored, bad):
    word = "NaN" if math.isnan(bad) else ("-infinity" if bad < 0 else "infinity")
    x = np.zeros((4, 3), np.float32)
    x[2, 1] = bad
    refused(
        upload(client, "a.safetensors", safetensors_bytes({"ok": np.ones(2), "feat": x})),
        422,
        "tensor 'feat'",
        word,
        "index [2, 1]",
        type_="non_finite",
    )
    refused(
        upload(client, "a.npz", npz_bytes(feat=x, ok=np.ones(3))),
        422,
        "array 'feat'",
        word,
        "index [2, 1]",
        type_="non_finite",
    )
    csv = f"a,b\n1,2\n3,{bad}\n".encode()
    refused(upload(client, "a.csv", csv), 422, "column 'b'", word, "line 3", type_="non_finite")
    pq = parquet_bytes({"a": pa.array([1.0, 2.0, 3.0]), "b": pa.array([0.0, bad, 1.0])})
    refused(upload(client, "a.parquet", pq), 422, "column 'b'", word, "row 1", type_="non_finite")
    nothing_stored()


def test_upload_over_the_size_limit_is_413_while_streaming(tmp_path, db_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=db_url, max_upload_bytes=2000))
    data = npz_bytes(x=np.zeros((40, 10)))  # ~3.4 kB: over the file limit, within the framing slack
    assert len(data) > 2000
    with keyed_client(app) as c:
        r = upload(c, "big.npz", data)
        refused(r, 413, "'big.npz'", "2000 bytes", "GRADTUNE_MAX_UPLOAD_BYTES")
        # A declared Content-Length far over the limit is refused before reading.
        r = upload(c, "huge.npz", b"\0" * 200_000)
        refused(r, 413, "2000 bytes")

        # Chunked, no Content-Length: counted as it streams.
        def body():
            yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="s.csv"\r\n\r\n'
            for _ in range(100):
                yield b"1,2\n" * 256
            yield b"\r\n--B--\r\n"

        r = c.post("/v1/datasets", content=body(), headers={"content-type": "multipart/form-data; boundary=B"})
        refused(r, 413, "'s.csv'", "2000 bytes")
        # Within the limit: accepted.
        assert upload(c, "small.csv", b"a,b\n1,2\n").status_code == 201
    assert count_datasets(app) == 1 and len(stored_files(app)) == 1 and temp_files(app) == []


def test_uploads_are_not_held_to_the_json_body_limit(tmp_path, db_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=db_url, max_body_bytes=1000))
    data = npz_bytes(x=np.zeros((50, 10)))
    with keyed_client(app) as c:
        assert upload(c, "d.npz", data).status_code == 201
        r = c.post("/v1/jobs", json=job_body(name="x" * 100, meta={"iterations": 5, "seed": 0}) | {"pad": "y" * 2000})
        assert r.status_code == 413


def test_malformed_uploads(client, nothing_stored):
    r = client.post("/v1/datasets", json={"file": "x"})
    refused(r, 415, "multipart/form-data", "'file'")
    refused(upload(client, "d.csv", b"a\n1\n", field="data"), 422, "Field required", "'file'", type_="missing")
    r = client.post("/v1/datasets", data={"file": "not a file"}, files={"other": ("o.csv", b"a\n1\n")})
    refused(r, 422, "no filename", type_="missing_filename")
    r = client.post("/v1/datasets", files=[("file", ("a.csv", b"a\n1\n")), ("file", ("b.csv", b"a\n2\n"))])
    refused(r, 422, "more than one", type_="too_many_files")
    incomplete = b'--B\r\nContent-Disposition: form-data; name="file"; filename="p.csv"\r\n\r\na,b\n1,2\n'
    r = client.post("/v1/datasets", content=incomplete, headers={"content-type": "multipart/form-data; boundary=B"})
    refused(r, 400, "closing boundary")
    r = client.post("/v1/datasets", content=b"x", headers={"content-type": "multipart/form-data"})
    refused(r, 400, "boundary")
    nothing_stored()


def test_a_path_in_the_filename_is_dropped(client):
    body = uploaded(client, "../../etc/x.csv", b"a\n1\n")
    assert body["filename"] == "x.csv"


# ------------------------------------------------------------------ list, get, delete


def test_list_is_newest_first_and_paginated(client):
    ids = [uploaded(client, f"d{i}.csv", f"a\n{i}\n".encode())["id"] for i in range(3)]
    r = client.get("/v1/datasets")
    assert r.status_code == 200
    body = r.json()
    assert body["total"] == 3 and body["limit"] == 20 and body["offset"] == 0
    assert [d["id"] for d in body["items"]] == ids[::-1]
    page = client.get("/v1/datasets", params={"limit": 2, "offset": 1}).json()
    assert [d["id"] for d in page["items"]] == ids[1::-1] and page["total"] == 3
    r = client.get("/v1/datasets", params={"limit": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "limit"


def test_unknown_dataset_is_404(client):
    r = client.get("/v1/datasets/nope")
    assert r.status_code == 404 and r.json() == {"detail": "dataset nope not found"}
    r = client.delete("/v1/datasets/nope")
    assert r.status_code == 404 and r.json() == {"detail": "dataset nope not found"}


def test_delete_removes_row_and_object(client, app):
    body = uploaded(client, "d.csv", b"a,b\n1,2\n")
    r = client.delete(f"/v1/datasets/{body['id']}")
    assert r.status_code == 204 and r.content == b""
    assert client.get(f"/v1/datasets/{body['id']}").status_code == 404
    assert count_datasets(app) == 0 and stored_files(app) == []
    # uploading the same bytes again creates it anew
    assert upload(client, "d.csv", b"a,b\n1,2\n").status_code == 201


def dataset_task(train: dict, val: dict | None = None, **extra) -> dict:
    data = {"source": "dataset", "train": train}
    if val is not None:
        data["val"] = val
    data.update(extra.pop("data", {}))
    task = {
        "name": "ds",
        "data": data,
        "model": {"kind": "mlp", "hidden": [8], "activation": "tanh"},
        "loss": "cross_entropy",
        "steps": 10,
        "batch_size": 4,
    }
    task.update(extra)
    return task


@pytest.fixture
def tensors(client) -> dict:
    """An npz dataset: x (40, 3), y (40,) labels 0..2, y_short (30,), x_1d (40,), yf (40,) floats,
    y2 (40, 2), x5 (40, 5)."""
    x, y = blobs(40, 3)
    return uploaded(
        client,
        "blobs.npz",
        npz_bytes(
            x=x,
            y=y,
            y_short=y[:30],
            x_1d=x[:, 0],
            yf=x[:, 0] * 1.5,
            y2=x[:, :2],
            x5=np.ones((40, 5), np.float32),
            yneg=y - 1,
        ),
    )


def test_delete_is_409_while_a_queued_job_uses_it_then_204_after_cancel(client, app, tensors):
    ds = tensors["id"]
    r = client.post("/v1/jobs", json=job_body(dataset_task({"dataset": ds, "x": "x", "y": "y"})))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with app.state.sessionmaker() as s:
        assert s.scalars(select(JobDataset.dataset_id).where(JobDataset.job_id == job_id)).all() == [ds]
    r = client.delete(f"/v1/datasets/{ds}")
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"dataset {ds} is used by queued job {job_id}; cancel the job or wait until it has finished, "
        "then delete the dataset"
    )
    assert client.get(f"/v1/datasets/{ds}").status_code == 200 and len(stored_files(app)) == 1
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    r = client.delete(f"/v1/datasets/{ds}")
    assert r.status_code == 204, r.text
    assert count_datasets(app) == 0 and stored_files(app) == []
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"  # the job is kept


def test_delete_is_409_while_a_running_job_uses_it(client, app, tensors):
    ds = tensors["id"]
    body = job_body(
        dataset_task({"dataset": ds, "x": "x", "y": "y"}),
        dataset_task({"dataset": ds, "x": "x5", "y": "y"}, name="other"),
    )
    job_ids = [client.post("/v1/jobs", json=body).json()["id"] for _ in range(2)]
    with app.state.sessionmaker.begin() as s:
        s.get(Job, job_ids[0]).status = "running"
    r = client.delete(f"/v1/datasets/{ds}")
    assert r.status_code == 409
    assert r.json()["detail"].startswith(f"dataset {ds} is used by ")
    assert "(and 1 more)" in r.json()["detail"]
    with app.state.sessionmaker.begin() as s:
        s.get(Job, job_ids[0]).status = "succeeded"
        s.get(Job, job_ids[1]).status = "failed"
    assert client.delete(f"/v1/datasets/{ds}").status_code == 204


# ------------------------------------------------------------------ jobs that name datasets


def submit_errors(client, *tasks) -> list[dict]:
    r = client.post("/v1/jobs", json=job_body(*tasks))
    assert r.status_code == 422, r.text
    return r.json()["detail"]


def only_error(client, *tasks) -> dict:
    errors = submit_errors(client, *tasks)
    assert len(errors) == 1, errors
    return errors[0]


def test_dataset_jobs_are_accepted(client, app, tensors):
    ds = tensors["id"]
    table = uploaded(client, "t.csv", csv_bytes(["a", "b", "c", "label"], [[i, i * 0.5, -i, i % 2] for i in range(20)]))
    pq = uploaded(
        client, "t.parquet", parquet_bytes({"u": pa.array(np.arange(10.0)), "v": pa.array(np.arange(10) % 3)})
    )
    tasks = [
        dataset_task({"dataset": ds, "x": "x", "y": "y"}, data={"val_fraction": 0.25, "seed": 3}),
        dataset_task({"dataset": ds, "x": "x", "y": "y"}, {"dataset": ds, "x": "x", "y": "y"}),
        dataset_task({"dataset": table["id"], "x": ["a", "b", "c"], "y": "label"}),
        dataset_task({"dataset": table["id"], "x": "a", "y": "b"}, loss="mse"),
        dataset_task({"dataset": ds, "x": "x", "y": "y2"}, loss="mse"),
        dataset_task({"dataset": pq["id"], "x": ["u"], "y": "v"}, batch_size=2),
    ]
    r = client.post("/v1/jobs", json=job_body(*tasks))
    assert r.status_code == 202, r.text
    with app.state.sessionmaker() as s:
        job = s.get(Job, r.json()["id"])
        spec = JobCreate.model_validate(job.spec)
        links = set(s.scalars(select(JobDataset.dataset_id).where(JobDataset.job_id == job.id)))
    assert links == {ds, table["id"], pq["id"]}
    assert spec.tasks[0].data.val_fraction == 0.25 and spec.tasks[0].data.seed == 3
    assert spec.tasks[1].data.val_fraction is None and spec.tasks[2].data.val_fraction == 0.2
    assert spec.dataset_ids() == [ds, table["id"], pq["id"]]


def test_x_and_y_of_different_lengths_are_refused(client, tensors, nothing_changed):
    e = only_error(client, dataset_task({"dataset": tensors["id"], "x": "x", "y": "y_short"}))
    assert e["field"] == "tasks[0].data.train.y" and e["type"] == "length_mismatch"
    assert e["msg"] == "y (tensor 'y_short') has 30 rows but x has 40; each row of features needs exactly one target"
    nothing_changed()


def test_dataset_reference_errors_name_the_field(client, tensors, nothing_changed):
    ds = tensors["id"]
    e = only_error(client, dataset_task({"dataset": "missing-id", "x": "x", "y": "y"}))
    assert e["field"] == "tasks[0].data.train.dataset" and e["type"] == "dataset_not_found"
    assert e["msg"].startswith("dataset missing-id not found; upload it with POST /v1/datasets")

    e = only_error(client, dataset_task({"dataset": ds, "x": "nope", "y": "y"}))
    assert e["field"] == "tasks[0].data.train.x" and e["type"] == "unknown_tensor"
    assert e["msg"].startswith(f"dataset {ds} (blobs.npz) has no tensor 'nope'; its tensors are ")
    assert "'x'" in e["msg"]

    e = only_error(client, dataset_task({"dataset": ds, "x": "x_1d", "y": "y"}))
    assert e["field"] == "tasks[0].data.train.x" and e["type"] == "x_not_2d"
    assert "has shape [40]; x must be 2-D" in e["msg"]

    e = only_error(client, dataset_task({"dataset": ds, "x": ["x"], "y": "y"}))
    assert e["field"] == "tasks[0].data.train.x" and e["type"] == "x_not_a_tensor_name"

    e = only_error(client, dataset_task({"dataset": ds, "x": "x", "y": "nope"}))
    assert e["field"] == "tasks[0].data.train.y" and e["type"] == "unknown_tensor"

    e = only_error(client, dataset_task({"dataset": ds, "x": "x", "y": "y"}, {"dataset": ds, "x": "x5", "y": "y"}))
    assert e["field"] == "tasks[0].data.val.x" and e["type"] == "width_mismatch"
    assert e["msg"].startswith("validation rows have 5 features but training rows have 3")

    e = only_error(client, dataset_task({"dataset": ds, "x": "x", "y": "y"}, batch_size=33))
    assert e["field"] == "tasks[0].batch_size" and e["type"] == "batch_too_large"
    assert "(32 rows)" in e["msg"]  # 40 rows, 8 for validation at val_fraction 0.2

    e = only_error(client, dataset_task({"dataset": ds, "x": "x", "y": "y"}, data={"val_fraction": 0.99}))
    assert e["field"] == "tasks[0].data.val_fraction" and e["type"] == "split_too_small"

    e = only_error(
        client, dataset_task({"dataset": ds, "x": "x", "y": "y"}, {"dataset": ds, "x": "x", "y": "y"}, data={"seed": 1})
    )
    assert e["field"] == "tasks[0].data" and "not both" in e["msg"]
    nothing_changed()


def test_cross_entropy_needs_integer_labels_from_the_metadata(client, tensors, nothing_changed):
    ds = tensors["id"]
    e = only_error(client, dataset_task({"dataset": ds, "x": "x", "y": "yf"}))
    assert e["field"] == "tasks[0].data.train.y" and e["type"] == "invalid_label"
    assert "not all whole numbers" in e["msg"]
    e = only_error(client, dataset_task({"dataset": ds, "x": "x", "y": "yneg"}))
    assert e["type"] == "invalid_label" and "values from -1 to 1" in e["msg"]
    e = only_error(client, dataset_task({"dataset": ds, "x": "x", "y": "y2"}))
    assert e["type"] == "labels_not_1d" and "shape [40, 2]" in e["msg"]
    # the same floats are fine as regression targets
    r = client.post("/v1/jobs", json=job_body(dataset_task({"dataset": ds, "x": "x", "y": "yf"}, loss="mse")))
    assert r.status_code == 202, r.text
    r = client.post(
        "/v1/jobs",
        json=job_body(
            dataset_task({"dataset": ds, "x": "x", "y": "y"}, {"dataset": ds, "x": "x", "y": "y2"}, loss="mse")
        ),
    )
    e = r.json()["detail"][0]
    assert r.status_code == 422 and e["field"] == "tasks[0].data.val.y" and e["type"] == "width_mismatch"


def test_column_references(client, nothing_changed):
    table = uploaded(client, "t.csv", csv_bytes(["a", "b", "label"], [[i, i / 3, i % 3] for i in range(12)]))
    ds = table["id"]
    e = only_error(client, dataset_task({"dataset": ds, "x": ["a", "zzz"], "y": "label"}))
    assert e["field"] == "tasks[0].data.train.x[1]" and e["type"] == "unknown_column"
    assert e["msg"] == f"dataset {ds} (t.csv) has no column 'zzz'; its columns are 'a', 'b', 'label'"
    e = only_error(client, dataset_task({"dataset": ds, "x": ["a", "a"], "y": "label"}))
    assert e["field"] == "tasks[0].data.train.x[1]" and e["type"] == "duplicate_column"
    e = only_error(client, dataset_task({"dataset": ds, "x": ["a"], "y": "b"}))
    assert e["field"] == "tasks[0].data.train.y" and e["type"] == "invalid_label"
    e = only_error(client, dataset_task({"dataset": ds, "x": ["a", "b"], "y": "label"}, batch_size=11))
    assert e["field"] == "tasks[0].batch_size" and "(10 rows)" in e["msg"]
    errors = submit_errors(client, dataset_task({"dataset": ds, "x": [], "y": "label"}))
    assert errors[0]["field"] == "tasks[0].data.train.x"
    nothing_changed()
    assert count_jobs(client.app) == 0


def test_the_unroll_estimate_uses_the_dataset_widths(client, app, tensors):
    """check_job sizes the MLP from the dataset: 3 inputs, 3 classes (labels 0..2)."""
    ds = DatasetPublic.model_validate(tensors)
    body = job_body(dataset_task({"dataset": ds.id, "x": "x", "y": "y"}, steps=1000))
    body["meta"] = {"method": "reverse"}
    job = JobCreate.model_validate(body)
    from service.validation import estimate_unroll_bytes

    need = estimate_unroll_bytes(job.tasks[0], (3, 3))
    settings = app.state.settings.model_copy(update={"max_unroll_bytes": need - 1})
    errors = check_job(job, settings, {ds.id: ds})
    assert [e["type"] for e in errors] == ["unroll_too_large"]
    assert check_job(job, app.state.settings.model_copy(update={"max_unroll_bytes": need}), {ds.id: ds}) == []


def test_openapi_documents_the_upload(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/datasets"]["post"]
    assert post["tags"] == ["datasets"]
    assert set(post["responses"]) >= {"200", "201", "400", "413", "415", "422"}
    schema = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file"]
    assert set(spec["paths"]["/v1/datasets/{dataset_id}"]["delete"]["responses"]) >= {"204", "404", "409"}
