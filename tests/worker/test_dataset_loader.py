"""worker.dataset_loader: the arrays a ``source: dataset`` task trains on, for every format,
fetched from the artifact store (in place, or through the local cache), selected and split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from service.main import create_app
from service.schemas import DatasetData
from service.storage import LocalStore
from tests.helpers.dataset_files import blobs, csv_bytes, npz_bytes, parquet_bytes, safetensors_bytes, safetensors_raw
from tests.helpers.support import keyed_client
from worker import dataset_loader
from worker.dataset_loader import DatasetUnavailable, load_dataset_task_data


@pytest.fixture(autouse=True)
def _fresh_cache():
    dataset_loader.clear_cache()
    yield
    dataset_loader.clear_cache()


@pytest.fixture
def settings(tmp_path, sqlite_url, make_settings):
    return make_settings(tmp_path, database_url=sqlite_url)


@pytest.fixture
def client(settings):
    with keyed_client(create_app(settings)) as c:
        yield c


def upload(client, filename: str, data: bytes) -> str:
    r = client.post("/v1/datasets", files={"file": (filename, data)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def split(n: int, val_fraction: float, seed: int):
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def test_safetensors_split_like_builtin(client, settings):
    x, y = blobs(50, 4)
    ds = upload(client, "d.safetensors", safetensors_bytes({"x": x, "y": y}))
    spec = {"source": "dataset", "train": {"dataset": ds, "x": "x", "y": "y"}, "val_fraction": 0.3, "seed": 7}
    xt, yt, xv, yv = load_dataset_task_data(spec, settings)
    train, val = split(50, 0.3, 7)
    assert len(val) == 15
    np.testing.assert_array_equal(xt, x[train])
    np.testing.assert_array_equal(yt, y[train])
    np.testing.assert_array_equal(xv, x[val])
    np.testing.assert_array_equal(yv, y[val])
    assert xt.dtype == np.float32 and yt.dtype == np.int64 and xt.flags.writeable
    # The model form works too, and defaults are 0.2 and seed 0.
    spec2 = DatasetData.model_validate({"source": "dataset", "train": {"dataset": ds, "x": "x", "y": "y"}})
    xt2, _, xv2, _ = load_dataset_task_data(spec2, settings)
    train, val = split(50, 0.2, 0)
    np.testing.assert_array_equal(xv2, x[val])
    np.testing.assert_array_equal(xt2, x[train])


def test_npz_with_explicit_validation_tensors(client, settings):
    x, y = blobs(30, 2)
    xv, yv = blobs(9, 2, seed=1)
    ds = upload(
        client,
        "d.npz",
        npz_bytes(True, x_train=x.astype(np.float64), y_train=y.astype(np.int32), x_val=xv, y_val=yv.astype(np.uint8)),
    )
    spec = {
        "source": "dataset",
        "train": {"dataset": ds, "x": "x_train", "y": "y_train"},
        "val": {"dataset": ds, "x": "x_val", "y": "y_val"},
    }
    a, b, c, d = load_dataset_task_data(spec, settings)
    np.testing.assert_array_equal(a, x.astype(np.float32))
    np.testing.assert_array_equal(b, y)
    np.testing.assert_array_equal(c, xv)
    np.testing.assert_array_equal(d, yv)
    assert [t.dtype for t in (a, b, c, d)] == [np.float32, np.int64, np.float32, np.int64]


def test_csv_columns_and_validation_from_another_dataset(client, settings):
    rows = [[i, i * 0.5, -i, i % 3] for i in range(20)]
    train = upload(client, "train.csv", csv_bytes(["a", "b", "c", "label"], rows))
    val = upload(client, "val.csv", csv_bytes(["label", "c", "b", "a"], [[1, 7, 8.5, 9], [0, 1, 2, 3]]))
    spec = {
        "source": "dataset",
        "train": {"dataset": train, "x": ["c", "a"], "y": "label"},
        "val": {"dataset": val, "x": ["c", "a"], "y": "label"},
    }
    xt, yt, xv, yv = load_dataset_task_data(spec, settings)
    table = np.array(rows, dtype=np.float64)
    np.testing.assert_array_equal(xt, table[:, [2, 0]].astype(np.float32))
    np.testing.assert_array_equal(yt, table[:, 3].astype(np.int64))
    np.testing.assert_array_equal(xv, np.array([[7, 9], [1, 3]], np.float32))
    np.testing.assert_array_equal(yv, [1, 0])
    assert yt.dtype == np.int64
    # One column as x is (N, 1); a float column as y stays float.
    spec = {"source": "dataset", "train": {"dataset": train, "x": "a", "y": "b"}, "val_fraction": 0.25, "seed": 2}
    xt, yt, xv, yv = load_dataset_task_data(spec, settings)
    tr, va = split(20, 0.25, 2)
    np.testing.assert_array_equal(xt, table[tr][:, [0]].astype(np.float32))
    np.testing.assert_array_equal(yv, table[va, 1].astype(np.float32))
    assert xt.shape == (15, 1) and yt.dtype == np.float32


def test_parquet_columns(client, settings):
    u = np.linspace(-1, 1, 12)
    ds = upload(
        client,
        "d.parquet",
        parquet_bytes(
            {
                "u": pa.array(u),
                "v": pa.array(np.arange(12), pa.int16()),
                "t": pa.array(u * 2, pa.float32()),
            }
        ),
    )
    spec = {"source": "dataset", "train": {"dataset": ds, "x": ["u", "v"], "y": "t"}, "val_fraction": 0.5, "seed": 1}
    xt, yt, xv, yv = load_dataset_task_data(spec, settings)
    tr, va = split(12, 0.5, 1)
    full = np.stack([u, np.arange(12)], axis=1).astype(np.float32)
    np.testing.assert_array_equal(xt, full[tr])
    np.testing.assert_array_equal(yv, (u * 2).astype(np.float32)[va])


def test_bfloat16_tensors_widen_to_float32(client, settings):
    x = np.array([[1.0, 2.0], [0.5, -3.0], [4.0, 8.0]], np.float32)
    raw = (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    ds = upload(
        client,
        "b.safetensors",
        safetensors_raw([("x", "BF16", [3, 2], raw), ("y", "I64", [3], np.array([0, 1, 0], "<i8").tobytes())]),
    )
    spec = {
        "source": "dataset",
        "train": {"dataset": ds, "x": "x", "y": "y"},
        "val": {"dataset": ds, "x": "x", "y": "y"},
    }
    xt, yt, _, _ = load_dataset_task_data(spec, settings)
    np.testing.assert_array_equal(xt, x)


class RemoteLike(LocalStore):
    """A local directory that pretends to be remote: no direct path, only downloads."""

    def __init__(self, root):
        super().__init__(root)
        self.downloads = 0

    def local_path(self, key):
        return None

    def get_file(self, key, local_path):
        self.downloads += 1
        super().get_file(key, local_path)


def test_a_remote_store_is_downloaded_once_into_the_cache(client, settings):
    x, y = blobs(20, 3)
    data = npz_bytes(x=x, y=y)
    ds = upload(client, "d.npz", data)
    store = RemoteLike(settings.resolved_artifact_url().removeprefix("file://"))
    spec = {"source": "dataset", "train": {"dataset": ds, "x": "x", "y": "y"}}
    first = load_dataset_task_data(spec, settings, store=store)
    again = load_dataset_task_data(spec, settings, store=store)
    assert store.downloads == 1
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    cache = settings.data_dir / "cache" / "artifacts"
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in cache.iterdir()) == [sha]
    assert (cache / sha).read_bytes() == data


def test_a_corrupt_download_is_refused_and_not_cached(client, settings, tmp_path):
    ds = upload(client, "d.csv", csv_bytes(["a", "b"], [[1, 0], [2, 1], [3, 0]]))
    store = RemoteLike(settings.resolved_artifact_url().removeprefix("file://"))
    sha = client.get(f"/v1/datasets/{ds}").json()["sha256"]
    store._path(sha).write_bytes(b"a,b\n9,9\n")  # the stored object no longer matches its key
    with pytest.raises(DatasetUnavailable, match="corrupt"):
        load_dataset_task_data(
            {"source": "dataset", "train": {"dataset": ds, "x": "a", "y": "b"}}, settings, store=store
        )
    cache = settings.data_dir / "cache" / "artifacts"
    assert list(cache.iterdir()) == []


def test_deleted_dataset_or_missing_object_is_a_clear_error(client, settings):
    x, y = blobs(10, 2)
    ds = upload(client, "d.npz", npz_bytes(x=x, y=y))
    spec = {"source": "dataset", "train": {"dataset": ds, "x": "x", "y": "y"}}
    sha = client.get(f"/v1/datasets/{ds}").json()["sha256"]
    settings.artifact_store().delete(sha)
    with pytest.raises(DatasetUnavailable, match=f"stored file {sha} is missing"):
        load_dataset_task_data(spec, settings)
    assert client.delete(f"/v1/datasets/{ds}").status_code == 204
    with pytest.raises(DatasetUnavailable, match=f"dataset {ds} \\(train\\) no longer exists"):
        load_dataset_task_data(spec, settings)


def test_an_open_session_can_be_passed(client, settings):
    x, y = blobs(10, 2)
    ds = upload(client, "d.npz", npz_bytes(x=x, y=y))
    app = client.app
    with app.state.sessionmaker() as session:
        xt, yt, xv, yv = load_dataset_task_data(
            {"source": "dataset", "train": {"dataset": ds, "x": "x", "y": "y"}}, settings, session=session
        )
    assert xt.shape == (8, 2) and xv.shape == (2, 2)
