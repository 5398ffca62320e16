"""A tenant's quota of concurrent uploads holds across API processes (two apps on one database stand
in for two processes), on SQLite and PostgreSQL: an upload held open in one makes the same tenant's
next upload in the other 429 while another tenant's proceeds; a slot goes back however the upload
ends (stored, refused, too large, the client gone, refused by the per-process limit); an expired slot does not count;
taking slots is race-free."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from service import keys, repository, upload_quota
from service.db.models import UploadSlot
from service.db.session import make_engine
from service.main import create_app
from tests.helpers.dataset_files import npz_bytes
from tests.helpers.support import keyed_client, stored_files, temp_files

SLOW = 30  # seconds a held upload waits at most (the test releases it long before)
TOO_MANY = "tenant 'alpha' has 1 uploads in progress, its limit is 1 (gradtune keys quota); try again in 5 seconds"


@pytest.fixture
def hold(monkeypatch):
    """While ``gate`` is closed the first dataset upload (of either app) stops inside its check,
    after its body was received, and sets ``inside``; the uploads after it pass."""
    import service.api.routes.datasets as datasets

    inside, gate = threading.Event(), threading.Event()
    real, calls = datasets.inspect_file, []

    def held(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            inside.set()
            assert gate.wait(SLOW)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "inspect_file", held)
    yield inside, gate
    gate.set()


@pytest.fixture
def two_apps(tmp_path, db_url, make_settings):
    """Two apps on one database (two API processes), alpha's quota of uploads in progress 1."""
    apps = [create_app(make_settings(tmp_path, database_url=db_url, max_upload_bytes=4096)) for _ in range(2)]
    with apps[0].state.sessionmaker() as s:
        keys.set_quotas(s, tenant="alpha", max_concurrent_uploads=1)
        s.commit()
    return apps


def _upload(client, data: bytes, name: str = "d.npz"):
    return client.post("/v1/datasets", files={"file": (name, data, "application/octet-stream")})


def _slots(app) -> list[tuple[str, bool]]:
    """The slots in the database: (tenant, expired)."""
    with app.state.sessionmaker() as s:
        now = datetime.now(UTC)
        rows = s.execute(select(UploadSlot.tenant, UploadSlot.expires_at)).all()
    return sorted((tenant, expires.replace(tzinfo=expires.tzinfo or UTC) <= now) for tenant, expires in rows)


def _add_slot(app, tenant: str, expires_in: timedelta) -> None:
    now = datetime.now(UTC)
    with app.state.sessionmaker() as s:
        s.add(UploadSlot(id=f"{tenant}-{expires_in}", tenant=tenant, started_at=now, expires_at=now + expires_in))
        s.commit()


def test_an_upload_in_one_process_counts_against_the_tenants_quota_in_another(two_apps, hold):
    app_a, app_b = two_apps
    inside, gate = hold
    with keyed_client(app_a, "alpha") as a, keyed_client(app_b, "alpha") as b_alpha, keyed_client(app_b, "beta") as b:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=_upload(a, npz_bytes(x=np.arange(3)))))
        worker.start()
        try:
            assert inside.wait(SLOW), "the first upload never reached its check"
            assert _slots(app_b) == [("alpha", False)]
            r = _upload(b_alpha, npz_bytes(x=np.arange(4)))
            assert r.status_code == 429, r.text
            assert r.json()["detail"] == TOO_MANY
            assert r.headers["retry-after"] == "5" and r.headers["connection"] == "close"
            assert _upload(b, npz_bytes(x=np.arange(5))).status_code == 201  # another tenant's quota is its own
        finally:
            gate.set()
            worker.join(SLOW)
        assert first["r"].status_code == 201, first["r"].text
        assert _slots(app_b) == []
        r = _upload(b_alpha, npz_bytes(x=np.arange(4)))  # A's slot was given back
        assert r.status_code == 201, r.text
    assert _slots(app_a) == [] and temp_files(app_a) == []


def test_an_expired_slot_does_not_count_and_is_removed(two_apps):
    app_a, app_b = two_apps
    _add_slot(app_a, "alpha", timedelta(hours=-1))  # a process that died mid-upload, long ago
    _add_slot(app_a, "beta", timedelta(hours=-1))  # another tenant's: left to its own uploads
    with keyed_client(app_b, "alpha") as b:
        r = _upload(b, npz_bytes(x=np.arange(3)))
        assert r.status_code == 201, r.text
        assert _slots(app_b) == [("beta", True)]
        _add_slot(app_a, "alpha", timedelta(hours=1))  # one that has not expired does count
        r = _upload(b, npz_bytes(x=np.arange(4)))
        assert r.status_code == 429 and r.json()["detail"] == TOO_MANY


def test_a_failed_upload_gives_its_slot_back(two_apps):
    _app_a, app_b = two_apps
    with keyed_client(app_b, "alpha") as b:
        for _ in range(2):
            r = _upload(b, b"not a zip")
            assert r.status_code == 422, r.text
            assert _slots(app_b) == []
            r = _upload(b, b"\0" * 10_000)  # over max_upload_bytes (4096)
            assert r.status_code == 413, r.text
            assert _slots(app_b) == []
        assert _upload(b, npz_bytes(x=np.arange(3))).status_code == 201
    assert _slots(app_b) == [] and stored_files(app_b) != [] and temp_files(app_b) == []


def test_a_client_that_disconnects_mid_upload_gives_its_slot_back(two_apps):
    """The body stops after part of the file and the client goes away (ASGI ``http.disconnect``)."""
    app = two_apps[1]
    head = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\nPK\x03\x04" + b"\0" * 100
    )
    messages = [{"type": "http.request", "body": head, "more_body": True}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    with keyed_client(app, "alpha") as b:  # the app started, and a key of alpha's
        headers = [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {b.key}".encode()),
            (b"content-type", b"multipart/form-data; boundary=b"),
            (b"content-length", b"4000"),
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/datasets",
            "raw_path": b"/v1/datasets",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
        }
        asyncio.run(app(scope, receive, send))
        assert messages == [] and sent[0]["status"] == 400, sent  # the body was read, then the client left
        assert _slots(app) == [] and temp_files(app) == []
        assert _upload(b, npz_bytes(x=np.arange(3))).status_code == 201


def test_an_upload_refused_by_the_per_process_limit_gives_its_slot_back(tmp_path, db_url, make_settings, hold):
    """GRADTUNE_MAX_CONCURRENT_UPLOADS stays per process: beta's upload holds this app's one slot,
    alpha's answers 503 there, and alpha's slot in the database is given back."""
    inside, gate = hold
    app = create_app(make_settings(tmp_path, database_url=db_url, max_concurrent_uploads=1))
    with keyed_client(app, "alpha") as a, keyed_client(app, "beta") as b:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=_upload(b, npz_bytes(x=np.arange(3)))))
        worker.start()
        try:
            assert inside.wait(SLOW), "the first upload never reached its check"
            r = _upload(a, npz_bytes(x=np.arange(4)))
            assert r.status_code == 503 and "GRADTUNE_MAX_CONCURRENT_UPLOADS" in r.json()["detail"], r.text
            assert _slots(app) == [("beta", False)]
        finally:
            gate.set()
            worker.join(SLOW)
        assert first["r"].status_code == 201, first["r"].text
    assert _slots(app) == []


def test_taking_a_slot_waits_for_another_transaction_counting_the_same_tenant(db_url, tmp_path, make_settings):
    """A take that holds the tenant's lock with its slot not yet committed: a second take of the same
    tenant waits for it, then counts that slot (quota 1: none left), instead of taking a second."""
    settings = make_settings(tmp_path, tenant_max_concurrent_uploads=1)
    engine = make_engine(db_url)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    try:
        with factory() as s:
            keys.ensure_tenant(s, name="alpha")
            s.commit()
        result: dict = {}
        with factory() as first:
            first.execute(select(func.count()).select_from(UploadSlot))  # SQLite: BEGIN IMMEDIATE
            repository.lock_tenant(first, tenant="alpha")
            now = datetime.now(UTC)
            first.add(UploadSlot(id="first", tenant="alpha", started_at=now, expires_at=now + timedelta(hours=1)))
            first.flush()

            def second() -> None:
                with factory() as s:
                    result["taken"] = upload_quota.take(s, tenant="alpha", settings=settings)

            thread = threading.Thread(target=second)
            thread.start()
            thread.join(1)  # without the lock it would take a slot now, counting none
            first.commit()
        thread.join(SLOW)
        taken = result["taken"]
        assert taken.slot is None and (taken.limit, taken.in_progress) == (1, 1)
    finally:
        engine.dispose()


def test_the_setting_and_the_quota_across_processes_are_documented():
    from pathlib import Path

    from service.settings import Settings

    assert Settings().upload_slot_seconds == 3600
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    assert "| `GRADTUNE_UPLOAD_SLOT_SECONDS` | 3600 |" in readme
    assert "its quota holds across all the API processes that share the database" in readme
    assert "(per API process)" not in readme and "uploads in progress per API process" not in readme
