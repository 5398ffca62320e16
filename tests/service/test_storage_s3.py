"""The S3 artifact store against a real S3-protocol server (moto's server mode, started here as
a subprocess on 127.0.0.1), and a full upload/delete through the API with
GRADTUNE_ARTIFACT_URL=s3://bucket/prefix. The local store passes the same contract tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid

import boto3
import numpy as np
import pytest

from service.main import create_app
from service.storage import LocalStore, ObjectMissing, S3Store, StoreError, open_store
from tests.helpers.dataset_files import blobs, npz_bytes
from tests.helpers.net import free_port
from tests.helpers.support import keyed_client

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """``http://127.0.0.1:<port>`` of a moto S3 server running for the whole session."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {**os.environ, **CREDENTIALS}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bucket(moto_endpoint, aws_env) -> str:
    name = f"gradtune-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


def objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    out = {}
    for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        out[obj["Key"]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/some/prefix", s3_endpoint_url=endpoint)


# ------------------------------------------------------------------ the contract, on both backends


def test_put_get_exists_delete(store, tmp_path):
    data = os.urandom(3000)
    key = hashlib.sha256(data).hexdigest()
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert store.exists(key) is False
    store.put_file(key, src)
    assert store.exists(key) is True
    assert src.read_bytes() == data  # the caller keeps its file
    store.put_file(key, src)  # the same key again: allowed, nothing changes
    dest = tmp_path / "out" / "copy.bin"
    store.get_file(key, dest)
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]  # no partial files left
    store.delete(key)
    assert store.exists(key) is False
    store.delete(key)  # deleting a missing key is fine
    with pytest.raises(ObjectMissing):
        store.get_file(key, tmp_path / "missing.bin")
    assert not (tmp_path / "missing.bin").exists()


def test_keys_cannot_escape(store, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(ValueError, match="invalid artifact key"):
            store.put_file(bad, src)


def test_s3_objects_live_under_the_prefix(moto_endpoint, bucket, tmp_path):
    store = open_store(f"s3://{bucket}/runs/a", s3_endpoint_url=moto_endpoint)
    assert isinstance(store, S3Store) and store.url == f"s3://{bucket}/runs/a"
    src = tmp_path / "f"
    src.write_bytes(b"hello")
    key = hashlib.sha256(b"hello").hexdigest()
    store.put_file(key, src)
    assert objects(moto_endpoint, bucket) == {f"runs/a/{key}": b"hello"}
    assert store.local_path(key) is None


def test_an_unreachable_s3_endpoint_is_a_store_error(aws_env, tmp_path):
    store = open_store("s3://bucket", s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreError, match="s3://bucket/"):
        store.exists("a" * 64)


def test_bad_urls_are_refused():
    with pytest.raises(ValueError, match="unsupported artifact store URL"):
        open_store("ftp://x/y")
    with pytest.raises(ValueError, match="absolute"):
        open_store("file://relative/path")
    with pytest.raises(ValueError, match="needs a bucket"):
        open_store("s3:///prefix")


# ------------------------------------------------------------------ through the API


def test_upload_and_delete_through_the_api_on_s3(moto_endpoint, bucket, tmp_path, db_url, make_settings):
    settings = make_settings(
        tmp_path, database_url=db_url, artifact_url=f"s3://{bucket}/datasets", s3_endpoint_url=moto_endpoint
    )
    app = create_app(settings)
    x, y = blobs(20, 3)
    data = npz_bytes(x=x, y=y)
    sha = hashlib.sha256(data).hexdigest()
    with keyed_client(app) as c:
        r = c.post("/v1/datasets", files={"file": ("d.npz", data)})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["sha256"] == sha and [t["name"] for t in body["tensors"]] == ["x", "y"]
        assert objects(moto_endpoint, bucket) == {f"datasets/{sha}": data}
        assert not (settings.data_dir / "artifacts").exists()  # nothing stored locally

        again = c.post("/v1/datasets", files={"file": ("d.npz", data)})
        assert again.status_code == 200 and again.json()["id"] == body["id"]
        assert list(objects(moto_endpoint, bucket)) == [f"datasets/{sha}"]

        # A refused file leaves nothing in the bucket (nor a temporary file).
        bad = npz_bytes(x=np.array([np.nan]))
        r = c.post("/v1/datasets", files={"file": ("bad.npz", bad)})
        assert r.status_code == 422 and "NaN" in r.json()["detail"][0]["msg"]
        assert list(objects(moto_endpoint, bucket)) == [f"datasets/{sha}"]
        assert list(settings.tmp_dir().iterdir()) == []

        # The worker's loader reads it back through its download cache.
        from worker.dataset_loader import clear_cache, load_dataset_task_data

        clear_cache()
        xt, yt, xv, yv = load_dataset_task_data(
            {"source": "dataset", "train": {"dataset": body["id"], "x": "x", "y": "y"}}, settings
        )
        assert xt.shape == (16, 3) and xv.shape == (4, 3)
        assert (settings.data_dir / "cache" / "artifacts" / sha).read_bytes() == data
        clear_cache()

        assert c.delete(f"/v1/datasets/{body['id']}").status_code == 204
        assert objects(moto_endpoint, bucket) == {}


def test_store_down_is_503_and_leaves_nothing(aws_env, tmp_path, sqlite_url, make_settings):
    settings = make_settings(
        tmp_path,
        database_url=sqlite_url,
        artifact_url="s3://nowhere/x",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
    )
    app = create_app(settings)
    with keyed_client(app) as c:
        r = c.post("/v1/datasets", files={"file": ("d.csv", b"a,b\n1,2\n")})
        assert r.status_code == 503, r.text
        assert r.json()["detail"].startswith("the artifact store is unavailable; try again later")
        assert c.get("/v1/datasets").json()["total"] == 0
    assert list(settings.tmp_dir().iterdir()) == []
