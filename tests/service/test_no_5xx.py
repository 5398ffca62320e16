"""Inputs that used to answer 500, now 4xx (or 503 with Retry-After), on SQLite and PostgreSQL.

* ``?offset=`` past what a database takes (SQLite: OverflowError, PostgreSQL: bigint out of range)
  -> 422 naming ``offset``; a huge ``limit`` -> 422 naming ``limit``.
* A NUL byte (or any control character) in a name or an id, in the body or the path (PostgreSQL
  cannot store or even compare a NUL in text) -> 422 naming the field; nothing stored.
* The database's connection pool exhausted -> 503 with Retry-After, then 200 once a connection is free.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy.orm import sessionmaker

from service.api.deps import MAX_OFFSET
from service.api.errors import POOL_RETRY_AFTER
from service.db.session import make_engine
from tests.service.conftest import job_body

LISTS = ["/v1/jobs", "/v1/datasets", "/v1/models"]


def _fields(response) -> list[str]:
    return [e["field"] for e in response.json()["detail"]]


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("offset", [10**20, 2**63, 2**63 - 1, MAX_OFFSET + 1])
def test_an_offset_past_the_cap_is_422_naming_it(client, path, offset):
    r = client.get(path, params={"offset": offset})
    assert r.status_code == 422, r.text
    assert _fields(r) == ["offset"]


@pytest.mark.parametrize("path", [*LISTS, "/v1/workers"])
def test_the_largest_offset_allowed_reaches_the_database(client, path):
    cap = MAX_OFFSET if path != "/v1/workers" else 1_000_000
    r = client.get(path, params={"offset": cap, "limit": 100})
    assert r.status_code == 200, r.text
    assert r.json()["items"] == [] and r.json()["offset"] == cap


@pytest.mark.parametrize("path", [*LISTS, "/v1/workers"])
@pytest.mark.parametrize("limit", [10**20, 2**63, 101])
def test_a_huge_limit_is_422_naming_it(client, path, limit):
    r = client.get(path, params={"limit": limit})
    assert r.status_code == 422, r.text
    assert _fields(r) == ["limit"]


def _with(body: dict, path: tuple, value) -> dict:
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


def _dataset_task(**train) -> dict:
    task = job_body()["tasks"][0]
    task["data"] = {"source": "dataset", "train": {"dataset": "d1", "x": "x", "y": "y", **train}}
    return task


CONTROL_BODIES = {
    "name": lambda ch: job_body(name=f"a{ch}b"),
    "tasks[0].name": lambda ch: _with(job_body(), ("tasks", 0, "name"), f"t{ch}"),
    "tasks[0].model.model": lambda ch: _with(
        job_body(), ("tasks", 0, "model"), {"kind": "exported", "model": f"m{ch}"}
    ),
    "tasks[0].data.train.dataset": lambda ch: job_body(_dataset_task(dataset=f"d{ch}")),
    "tasks[0].data.train.x": lambda ch: job_body(_dataset_task(x=f"col{ch}")),
    "tasks[0].data.train.x[1]": lambda ch: job_body(_dataset_task(x=["a", f"b{ch}"])),
    "tasks[0].data.train.y": lambda ch: job_body(_dataset_task(y=f"{ch}")),
}


@pytest.mark.parametrize("ch", ["\x00", "\x1f", "\n", "\x7f"], ids=["nul", "us", "newline", "del"])
@pytest.mark.parametrize("field", sorted(CONTROL_BODIES))
def test_a_control_character_in_a_name_or_id_is_422_naming_the_field(client, nothing_changed, field, ch):
    r = client.post("/v1/jobs", json=CONTROL_BODIES[field](ch))
    assert r.status_code == 422, r.text
    assert field in _fields(r)
    hit = next(e for e in r.json()["detail"] if e["field"] == field)
    assert hit["type"] == "control_character"
    assert f"U+{ord(ch):04X}" in hit["msg"]
    nothing_changed()


def test_printable_unicode_names_are_still_accepted(client):
    r = client.post("/v1/jobs", json=_with(job_body(name="réseau ✓ 網"), ("tasks", 0, "name"), "t é"))
    assert r.status_code == 202, r.text
    assert r.json()["name"] == "réseau ✓ 網"


ID_ROUTES = [
    ("GET", "/v1/jobs/{}", "job_id"),
    ("GET", "/v1/jobs/{}/history", "job_id"),
    ("GET", "/v1/jobs/{}/settings", "job_id"),
    ("POST", "/v1/jobs/{}/cancel", "job_id"),
    ("GET", "/v1/datasets/{}", "dataset_id"),
    ("DELETE", "/v1/datasets/{}", "dataset_id"),
    ("GET", "/v1/models/{}", "model_id"),
    ("DELETE", "/v1/models/{}", "model_id"),
]


@pytest.mark.parametrize(("method", "template", "param"), ID_ROUTES)
def test_a_nul_in_a_path_id_is_422_naming_it(client, method, template, param):
    r = client.request(method, template.format("a%00b"))
    assert r.status_code == 422, r.text
    assert _fields(r) == [param]
    # and an id that merely does not exist is still 404
    assert client.request(method, template.format("no-such-id")).status_code == 404


def test_pool_exhaustion_is_503_with_retry_after(app, settings):
    """One connection in the pool, held here: a request waits pool_timeout, then gets 503."""
    from tests.helpers.support import keyed_client

    original = app.state.engine
    tiny = make_engine(settings.resolved_database_url(), pool_size=1, max_overflow=0, pool_timeout=0.3)
    app.state.engine = tiny
    app.state.sessionmaker = sessionmaker(bind=tiny, expire_on_commit=False)
    try:
        with keyed_client(app) as client:
            assert client.get("/v1/jobs").status_code == 200
            held = tiny.connect()  # the only connection
            try:
                t0 = time.monotonic()
                r = client.get("/v1/jobs")
                waited = time.monotonic() - t0
                assert r.status_code == 503, r.text
                assert r.headers["Retry-After"] == str(POOL_RETRY_AFTER)
                assert "database connection" in r.json()["detail"]
                assert waited >= 0.3
                r = client.post("/v1/jobs", json=job_body())
                assert r.status_code == 503 and "Retry-After" in r.headers, r.text
            finally:
                held.close()
            assert client.get("/v1/jobs").status_code == 200
    finally:
        original.dispose()
        tiny.dispose()
