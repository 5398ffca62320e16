"""Isolation and quotas between tenants, on SQLite and PostgreSQL: listings, uploads of the same
bytes, deletes and the stored object, a job naming another tenant's dataset, admin listings, quotas
(active jobs 429, stored bytes 413, concurrent uploads 429), the Host allowlist and CORS."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service import keys
from service.main import create_app
from service.settings import LOOPBACK_NAMES, Settings
from tests.helpers.dataset_files import csv_bytes
from tests.helpers.support import api_key, bearer, keyed_client
from tests.service.conftest import job_body

CSV = csv_bytes(["a", "b", "y"], [[0, 1, 0], [1, 0, 1], [1, 1, 0], [0, 0, 1]])


@pytest.fixture
def app(tmp_path, db_url, make_settings):
    return create_app(make_settings(tmp_path, database_url=db_url))


def _dataset_job(dataset_id: str) -> dict:
    body = job_body()
    data = {"source": "dataset", "train": {"dataset": dataset_id, "x": ["a", "b"], "y": "y"}, "val_fraction": 0.25}
    body["tasks"][0].update(data=data, batch_size=1)
    return body


def test_the_same_bytes_are_a_dataset_per_tenant_and_the_object_stays_while_one_holds_it(app):
    store = app.state.store
    with keyed_client(app, "alpha") as a, keyed_client(app, "beta") as b:
        first = a.post("/v1/datasets", files={"file": ("d.csv", CSV)})
        again = a.post("/v1/datasets", files={"file": ("d.csv", CSV)})
        theirs = b.post("/v1/datasets", files={"file": ("other-name.csv", CSV)})
        assert (first.status_code, again.status_code, theirs.status_code) == (201, 200, 201)
        assert first.json()["id"] == again.json()["id"] != theirs.json()["id"]
        assert theirs.json()["filename"] == "other-name.csv" and theirs.json()["tenant"] == "beta"
        sha = first.json()["sha256"]
        assert store.exists(sha)

        assert a.delete(f"/v1/datasets/{theirs.json()['id']}").status_code == 404  # not alpha's
        assert a.delete(f"/v1/datasets/{first.json()['id']}").status_code == 204
        assert store.exists(sha)  # beta's dataset still holds the object
        assert b.get(f"/v1/datasets/{theirs.json()['id']}").status_code == 200
        assert b.delete(f"/v1/datasets/{theirs.json()['id']}").status_code == 204
        assert not store.exists(sha)  # nothing references it now


def test_a_job_may_name_only_its_own_tenants_datasets(app):
    with keyed_client(app, "alpha") as a, keyed_client(app, "beta") as b:
        ds = a.post("/v1/datasets", files={"file": ("d.csv", CSV)}).json()["id"]
        refused = b.post("/v1/jobs", json=_dataset_job(ds))
        unknown = b.post("/v1/jobs", json=_dataset_job("no-such-dataset"))
        assert refused.status_code == unknown.status_code == 422
        assert refused.json()["detail"][0]["msg"].replace(ds, "X") == unknown.json()["detail"][0]["msg"].replace(
            "no-such-dataset", "X"
        )
        assert a.post("/v1/jobs", json=_dataset_job(ds)).status_code == 202


def test_listings_show_ones_own_and_an_admin_lists_across_tenants(app):
    with keyed_client(app, "alpha") as a, keyed_client(app, "beta") as b, keyed_client(app, "ops", admin=True) as ops:
        ja = a.post("/v1/jobs", json=job_body()).json()["id"]
        jb = b.post("/v1/jobs", json=job_body()).json()["id"]
        assert [j["id"] for j in a.get("/v1/jobs").json()["items"]] == [ja]
        assert b.get("/v1/jobs").json()["total"] == 1
        assert {j["id"] for j in ops.get("/v1/jobs").json()["items"]} == {ja, jb}
        page = ops.get("/v1/jobs", params={"tenant": "beta"}).json()
        assert [j["id"] for j in page["items"]] == [jb] and page["total"] == 1
        assert a.get("/v1/jobs", params={"tenant": "alpha"}).status_code == 200
        r = a.get("/v1/jobs", params={"tenant": "beta"})
        assert r.status_code == 403 and "only an admin key" in r.json()["detail"]
        assert ops.get(f"/v1/jobs/{ja}").json()["tenant"] == "alpha"
        assert a.post(f"/v1/jobs/{jb}/cancel").status_code == 404
        assert b.get(f"/v1/jobs/{jb}").json()["status"] == "queued"


def test_active_jobs_quota_answers_429_with_retry_after(app):
    with app.state.sessionmaker() as s:
        keys.set_quotas(s, tenant="alpha", max_active_jobs=2)
        s.commit()
    with keyed_client(app, "alpha") as a, keyed_client(app, "beta") as b:
        first = [a.post("/v1/jobs", json=job_body()).json()["id"] for _ in range(2)]
        r = a.post("/v1/jobs", json=job_body())
        assert r.status_code == 429 and r.headers["retry-after"] == "30"
        assert r.json()["detail"].startswith("tenant 'alpha' has 2 active jobs (queued or running), its limit is 2")
        assert b.post("/v1/jobs", json=job_body()).status_code == 202  # another tenant's quota is its own
        assert a.post(f"/v1/jobs/{first[0]}/cancel").status_code == 202
        assert a.post("/v1/jobs", json=job_body()).status_code == 202  # a cancelled job is not active


def test_stored_bytes_quota_answers_413(tmp_path, db_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=db_url, tenant_max_stored_bytes=len(CSV) + 10))
    with keyed_client(app, "alpha") as a:
        assert a.post("/v1/datasets", files={"file": ("d.csv", CSV)}).status_code == 201
        assert a.post("/v1/datasets", files={"file": ("d.csv", CSV)}).status_code == 200  # the same bytes: no more
        other = csv_bytes(["a", "y"], [[1, 0], [2, 1]])
        r = a.post("/v1/datasets", files={"file": ("e.csv", other)})
        assert r.status_code == 413
        assert (
            f"stores {len(CSV)} bytes" in r.json()["detail"] and f"quota of {len(CSV) + 10} bytes" in r.json()["detail"]
        )
        assert a.get("/v1/datasets").json()["total"] == 1


def test_concurrent_uploads_quota_answers_429(app):
    """One upload of alpha's in progress (its slot in the database, as while its body streams): the
    next gets 429; another tenant's does not; a quota of 0 is 403 (waiting would not help).
    tests/service/test_tenant_upload_quota.py: the quota across API processes."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import delete, func, select

    from service.db.models import UploadSlot

    with app.state.sessionmaker() as s:
        keys.set_quotas(s, tenant="alpha", max_concurrent_uploads=1)
        keys.set_quotas(s, tenant="gamma", max_concurrent_uploads=0)
        now = datetime.now(UTC)
        s.add(UploadSlot(id="held", tenant="alpha", started_at=now, expires_at=now + timedelta(hours=1)))
        s.commit()
    with keyed_client(app, "alpha") as a, keyed_client(app, "beta") as b, keyed_client(app, "gamma") as g:
        r = a.post("/v1/datasets", files={"file": ("d.csv", CSV)})
        assert r.status_code == 429 and r.headers["retry-after"] == "5" and r.headers["connection"] == "close"
        assert r.json()["detail"] == (
            "tenant 'alpha' has 1 uploads in progress, its limit is 1 (gradtune keys quota); try again in 5 seconds"
        )
        assert b.post("/v1/datasets", files={"file": ("d.csv", CSV)}).status_code == 201
        with app.state.sessionmaker() as s:
            s.execute(delete(UploadSlot).where(UploadSlot.id == "held"))
            s.commit()
        assert a.post("/v1/datasets", files={"file": ("d.csv", CSV)}).status_code == 201
        with app.state.sessionmaker() as s:  # released after each upload
            assert s.scalar(select(func.count()).select_from(UploadSlot)) == 0
        zero = g.post("/v1/datasets", files={"file": ("d.csv", CSV)})
        assert zero.status_code == 403 and "quota of uploads in progress is 0" in zero.json()["detail"]


def test_the_worker_refuses_another_tenants_dataset(app):
    """A job row that names another tenant's dataset (written past the API) fails in the loader."""
    from worker.dataset_loader import DatasetUnavailable, load_dataset_task_data

    with keyed_client(app, "alpha") as a:
        ds = a.post("/v1/datasets", files={"file": ("d.csv", CSV)}).json()["id"]
    data = _dataset_job(ds)["tasks"][0]["data"]
    settings = app.state.settings
    with app.state.sessionmaker() as s:
        x, *_ = load_dataset_task_data(data, settings, session=s, store=app.state.store, tenant="alpha")
        assert x.shape[1] == 2
        with pytest.raises(DatasetUnavailable, match=f"dataset {ds} \\(train\\) no longer exists for tenant 'beta'"):
            load_dataset_task_data(data, settings, session=s, store=app.state.store, tenant="beta")


# ---------------------------------------------------------------- Host allowlist, CORS


def test_the_host_allowlist_defaults_to_loopback_names_when_bound_to_loopback(monkeypatch):
    monkeypatch.delenv("GRADTUNE_ALLOWED_HOSTS", raising=False)
    assert Settings().resolved_allowed_hosts() == list(LOOPBACK_NAMES)
    assert Settings(host="0.0.0.0").resolved_allowed_hosts() == ["*"]
    monkeypatch.setenv("GRADTUNE_ALLOWED_HOSTS", "tune.example.org, 10.0.0.5")
    assert Settings(host="0.0.0.0").resolved_allowed_hosts() == ["tune.example.org", "10.0.0.5"]


def test_a_rebound_host_name_is_refused_before_anything_runs(tmp_path, sqlite_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=sqlite_url, allowed_hosts=list(LOOPBACK_NAMES)))
    key = api_key(app)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/v1/jobs", headers=bearer(key)).status_code == 200
        assert c.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200
        evil = c.get("/v1/jobs", headers={**bearer(key), "Host": "attacker.example:8000"})
        assert evil.status_code == 400 and evil.text == "Invalid host header"


def test_no_cors_unless_configured(tmp_path, sqlite_url, make_settings):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    plain = create_app(make_settings(tmp_path, database_url=sqlite_url))
    with keyed_client(plain) as c:
        r = c.get("/v1/jobs", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in c.options("/v1/jobs", headers=preflight).headers
    allowed = create_app(make_settings(tmp_path, database_url=sqlite_url, cors_origins=["https://ui.example"]))
    with keyed_client(allowed) as c:
        ok = c.options("/v1/jobs", headers={**preflight, "Origin": "https://ui.example"})
        assert ok.headers["access-control-allow-origin"] == "https://ui.example"
        assert "access-control-allow-origin" not in c.options("/v1/jobs", headers=preflight).headers


# ---------------------------------------------------------------- races and side channels


def test_an_upload_restores_the_object_a_concurrent_delete_removed(app, monkeypatch):
    """beta uploads bytes alpha holds while alpha deletes its dataset: whichever order the two take,
    beta's dataset ends with its object (the upload checks again under the object's lock)."""
    from service import repository

    store = app.state.store
    with keyed_client(app, "alpha") as a, keyed_client(app, "beta") as b:
        first = a.post("/v1/datasets", files={"file": ("d.csv", CSV)}).json()
        real_lock = repository.lock_object

        def delete_wins(session, *, sha256):  # alpha's delete committed and removed the object just now
            with app.state.sessionmaker() as other:
                repository.delete_dataset(other, dataset_id=first["id"])
                other.commit()
            store.delete(sha256)
            monkeypatch.setattr(repository, "lock_object", real_lock)
            real_lock(session, sha256=sha256)

        monkeypatch.setattr(repository, "lock_object", delete_wins)
        theirs = b.post("/v1/datasets", files={"file": ("d.csv", CSV)})
        assert theirs.status_code == 201, theirs.text
        assert store.exists(first["sha256"])
        assert a.get(f"/v1/datasets/{first['id']}").status_code == 404


def test_a_new_row_writes_the_object_even_when_another_tenant_holds_it(app, monkeypatch):
    """The first upload of bytes by a tenant costs a full write whether or not someone else holds
    them, so its answer time says nothing about other tenants' files."""
    store = app.state.store
    calls: list[bool] = []
    real_put = store.put_file
    monkeypatch.setattr(
        store,
        "put_file",
        lambda key, path, overwrite=False: (calls.append(overwrite), real_put(key, path, overwrite=overwrite)),
    )
    with keyed_client(app, "alpha") as a, keyed_client(app, "beta") as b:
        assert a.post("/v1/datasets", files={"file": ("d.csv", CSV)}).status_code == 201
        assert calls == [True]
        assert b.post("/v1/datasets", files={"file": ("d.csv", CSV)}).status_code == 201
        assert calls == [True, True]


def test_two_submits_at_once_cannot_both_pass_the_active_jobs_quota(app):
    from concurrent.futures import ThreadPoolExecutor

    with app.state.sessionmaker() as s:
        keys.set_quotas(s, tenant="alpha", max_active_jobs=1)
        s.commit()
    key = api_key(app, "alpha")
    with TestClient(app, headers=bearer(key)) as c, ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            codes = sorted(
                f.result().status_code for f in [pool.submit(c.post, "/v1/jobs", json=job_body()) for _ in range(4)]
            )
            assert codes == [202, 429, 429, 429], codes
            job = c.get("/v1/jobs", params={"status": "queued"}).json()["items"][0]["id"]
            assert c.post(f"/v1/jobs/{job}/cancel").status_code == 202


def test_a_flood_of_unknown_keys_does_not_take_sqlites_write_lock(tmp_path, sqlite_url, make_settings):
    import sqlite3
    import time
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(make_settings(tmp_path, database_url=sqlite_url))
    writer = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None, timeout=30)
    with TestClient(app) as c, ThreadPoolExecutor(max_workers=2) as pool:
        writer.execute("BEGIN IMMEDIATE")  # a worker's commit in progress
        try:
            t0 = time.monotonic()
            for _ in range(5):
                r = pool.submit(c.get, "/v1/jobs", headers=bearer(keys.new_key()[1])).result(timeout=5)
                assert r.status_code == 401
            assert time.monotonic() - t0 < 5
        finally:
            writer.execute("COMMIT")
            writer.close()


def test_tenant_names_from_the_query_are_checked(app):
    with keyed_client(app, "ops", admin=True) as ops:
        for bad in ("\x00", "alpha\n", "A", "x" * 65):
            r = ops.get("/v1/jobs", params={"tenant": bad})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "tenant"], (bad, r.text)
    with pytest.raises(keys.BadTenant):
        keys.check_tenant_name("alpha\n")


def test_a_quota_of_zero_active_jobs_is_403(app):
    with app.state.sessionmaker() as s:
        keys.set_quotas(s, tenant="alpha", max_active_jobs=0)
        s.commit()
    with keyed_client(app, "alpha") as a:
        r = a.post("/v1/jobs", json=job_body())
    assert r.status_code == 403 and "quota of active jobs is 0" in r.json()["detail"]
