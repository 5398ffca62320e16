"""Every /v1 route x {no key, malformed key, unknown key, revoked key, another tenant's key, the
owner's key, an admin key}, on SQLite and PostgreSQL: the status each must answer.

Tenant ``alpha`` owns a job, a dataset and a model. ``beta`` is another tenant; ``ops`` holds the
admin key. A route the app gains without a row here fails ``test_the_matrix_covers_every_route``.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service import keys
from service.main import create_app
from tests.helpers.dataset_files import csv_bytes
from tests.helpers.pt2_files import mlp_pt2
from tests.helpers.support import api_key, bearer
from tests.service.conftest import job_body

CSV = csv_bytes(["a", "b", "y"], [[0, 1, 0], [1, 0, 1], [1, 1, 0], [0, 0, 1]])
PT2, _ = mlp_pt2([2, 4, 2])
WHO = ("none", "malformed", "unknown", "revoked", "other", "own", "admin")


class World:
    """The app, the keys, and alpha's resources (made anew by ``seed`` for routes that change them)."""

    def __init__(self, app) -> None:
        self.app = app
        self.http = TestClient(app)
        self.keys = {
            "own": api_key(app, "alpha"),
            "other": api_key(app, "beta"),
            "admin": api_key(app, "ops", admin=True),
            "revoked": api_key(app, "alpha"),
            "unknown": keys.new_key()[1],
        }
        with app.state.sessionmaker() as s:
            keys.revoke_key(s, key_id=keys.KEY_RE.match(self.keys["revoked"]).group(1))
            s.commit()
        self.ids = self.seed()

    def headers(self, who: str) -> dict[str, str]:
        if who == "none":
            return {}
        if who == "malformed":
            return {"Authorization": "Bearer not-a-gradtune-key"}
        return bearer(self.keys[who])

    def seed(self) -> dict[str, str]:
        own = self.headers("own")
        job = self.http.post("/v1/jobs", json=job_body(), headers=own)
        dataset = self.http.post("/v1/datasets", files={"file": ("d.csv", CSV)}, headers=own)
        model = self.http.post("/v1/models", files={"file": ("m.pt2", PT2)}, headers=own)
        assert job.status_code == 202 and {dataset.status_code, model.status_code} <= {200, 201}
        # A queued job of alpha's that names the dataset: while it waits, a delete of it is refused.
        body = job_body()
        data = {"source": "dataset", "train": {"dataset": dataset.json()["id"], "x": ["a", "b"], "y": "y"}}
        body["tasks"][0].update(data=dict(data, val_fraction=0.25), batch_size=1)
        assert self.http.post("/v1/jobs", json=body, headers=own).status_code == 202
        # A cancelled job, whose event stream ends at once.
        done = self.http.post("/v1/jobs", json=job_body(), headers=own).json()["id"]
        assert self.http.post(f"/v1/jobs/{done}/cancel", headers=own).status_code == 202
        study = self.http.post("/v1/studies", json={"name": "s"}, headers=own)
        assert study.status_code == 201
        return {
            "job": job.json()["id"],
            "dataset": dataset.json()["id"],
            "model": model.json()["id"],
            "done": done,
            "study": study.json()["id"],
        }

    def call(self, method: str, path: str, who: str, **kw):
        return self.http.request(method, path.format(**self.ids), headers=self.headers(who), **kw)


def _listed(field: str):
    """A listing check: 200, and whether alpha's row is in it."""

    def check(world: World, response, who: str) -> None:
        assert response.status_code == 200, response.text
        ids = {item["id"] for item in response.json()["items"]}
        assert (world.ids[field] in ids) == (who in ("own", "admin")), (who, ids)

    return check


def _status(own: int, other: int = 404, admin: int | None = None):
    wanted = {"own": own, "other": other, "admin": own if admin is None else admin}

    def check(world: World, response, who: str) -> None:
        assert response.status_code == wanted[who], (who, response.status_code, response.text)

    return check


# (method, path, request keywords, fresh resources per call, check of the keyed answers)
ROUTES = [
    ("POST", "/v1/jobs", {"json": job_body()}, False, _status(202, other=202)),
    ("GET", "/v1/jobs", {}, False, _listed("job")),
    ("GET", "/v1/jobs/{job}", {}, False, _status(200)),
    ("GET", "/v1/jobs/{job}/history", {}, False, _status(200)),
    ("GET", "/v1/jobs/{job}/settings", {}, False, _status(409)),  # queued: no settings yet
    ("GET", "/v1/jobs/{done}/events", {}, False, _status(200)),
    ("POST", "/v1/jobs/{job}/cancel", {}, True, _status(202)),
    # alpha sent these bytes before (200, its own row); beta and ops get rows of their own (201)
    ("POST", "/v1/datasets", {"files": {"file": ("d.csv", CSV)}}, False, _status(200, other=201, admin=201)),
    ("GET", "/v1/datasets", {}, False, _listed("dataset")),
    ("GET", "/v1/datasets/{dataset}", {}, False, _status(200)),
    ("DELETE", "/v1/datasets/{dataset}", {}, True, _status(409)),  # alpha's queued job uses it
    ("POST", "/v1/models", {"files": {"file": ("m.pt2", PT2)}}, False, _status(200, other=201, admin=201)),
    ("GET", "/v1/models", {}, False, _listed("model")),
    ("GET", "/v1/models/{model}", {}, False, _status(200)),
    ("DELETE", "/v1/models/{model}", {}, True, _status(204)),
    ("GET", "/v1/workers", {}, False, _status(200, other=200)),
    ("POST", "/v1/studies", {"json": {"name": "s"}}, False, _status(201, other=201)),
    ("GET", "/v1/studies", {}, False, _listed("study")),
    ("GET", "/v1/studies/{study}", {}, False, _status(200)),
    ("GET", "/v1/studies/{study}/settings", {}, False, _status(200)),
    ("GET", "/v1/studies/{study}/history", {}, False, _status(200)),
]
REFUSED = {
    "none": "this route needs an API key",
    "malformed": "the API key is malformed",
    "unknown": "the API key is not known to this server",
    "revoked": "was revoked",
}


def test_the_matrix_covers_every_route(tmp_path, make_settings):
    app = create_app(make_settings(tmp_path))
    paths = app.openapi()["paths"]
    served = {(method.upper(), path) for path, ops in paths.items() if path.startswith("/v1") for method in ops}
    listed = {
        (m, p.replace("{job}", "{job_id}").replace("{done}", "{job_id}").replace("{dataset}", "{dataset_id}"))
        for m, p, *_ in ROUTES
    }
    listed = {(m, p.replace("{model}", "{model_id}").replace("{study}", "{study_id}")) for m, p in listed}
    assert served == listed


@pytest.fixture
def world(tmp_path, db_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=db_url, key_cache_seconds=0))
    with TestClient(app):
        yield World(app)


def test_every_route_for_every_kind_of_key(world, capsys):
    counts: dict[str, int] = {}
    for method, path, kw, fresh, check in ROUTES:
        for who in WHO:
            if fresh:
                world.ids = world.seed()
            response = world.call(method, path, who, **kw)
            if who in REFUSED:
                assert response.status_code == 401, (method, path, who, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert REFUSED[who] in response.json()["detail"], response.json()
            else:
                check(world, response, who)
            counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1
    with capsys.disabled():
        print(f"\nauth matrix: {len(ROUTES)} routes x {len(WHO)} keys; statuses {dict(sorted(counts.items()))}")


def test_another_tenants_id_answers_exactly_as_an_unknown_id(world):
    for kind in ("job", "dataset", "model"):
        path = f"/v1/{kind}s/{{}}"
        theirs = world.http.get(path.format(world.ids[kind]), headers=world.headers("other"))
        unknown = world.http.get(path.format("0" * 8), headers=world.headers("other"))
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.json()["detail"].replace(world.ids[kind], "ID") == unknown.json()["detail"].replace("0" * 8, "ID")
        assert dict(theirs.headers).keys() == dict(unknown.headers).keys()


def test_the_openapi_description_declares_the_bearer_scheme_on_every_v1_route(tmp_path, make_settings):
    spec = create_app(make_settings(tmp_path)).openapi()
    scheme = spec["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")  # /docs shows an Authorize button
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            secured = op.get("security") == [{"apiKey": []}]
            assert secured == path.startswith("/v1"), (method, path, op.get("security"))
            assert ("401" in op["responses"]) == path.startswith("/v1"), (method, path)


def test_no_key_is_refused_before_the_body_is_read(tmp_path, make_settings, sqlite_url):
    """Without a valid key a /v1 request is answered 401 before its body is parsed: broken JSON or
    a body past the size limit still gets 401, not 400 or 413."""
    app = create_app(make_settings(tmp_path, database_url=sqlite_url, max_body_bytes=1024))
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer " + keys.new_key()[1]}):
            broken = c.post("/v1/jobs", content=b"{not json", headers={**headers, "Content-Type": "application/json"})
            big = c.post(
                "/v1/jobs", content=b"[" + b"0," * 4096 + b"0]", headers={**headers, "Content-Type": "application/json"}
            )
            assert broken.status_code == big.status_code == 401, (broken.text, big.text)
        own = bearer(api_key(app))
        assert (
            c.post("/v1/jobs", content=b"{not json", headers={**own, "Content-Type": "application/json"}).status_code
            == 400
        )
