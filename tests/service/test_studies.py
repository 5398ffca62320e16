"""/v1/studies and a job's ``study``: create, list, read; tenant scoping (another tenant's study is
404, and a job cannot name it); the fit check (422 naming what differs); the pool's positions and
held-out flags; a warm start from the study's learned settings; a job's ``study`` in its views
(post, get in one query, list, cancel, events) and GET /v1/jobs?study=, tenants kept apart."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, event, select

from gradtune.spec.hyper import STENCIL_ITERATIONS, WARM_LINE_ITERATIONS, WARM_RICH_ITERATIONS
from gradtune.sse import parse_sse
from service.db.models import Job, Study, StudyJob, StudyTask
from tests.helpers.support import keyed_client
from tests.service.conftest import INLINE_TASK, job_body


def _study(client, **body) -> dict:
    r = client.post("/v1/studies", json={"name": "s", **body})
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"/v1/studies/{r.json()['id']}"
    return r.json()


def _in_study(study_id: str, *tasks: dict, **top) -> dict:
    body = job_body(*tasks, **top)
    del body["hyperparameters"]
    body["study"] = study_id
    return body


def _fields(r) -> list[str]:
    assert r.status_code == 422, r.text
    return [e["field"] for e in r.json()["detail"]]


def test_create_list_get_and_settings_before_any_update(client):
    s = _study(client, hyperparameters={"lr": 0.05, "momentum": 0.5, "per_layer": True}, holdout_every=3)
    assert s["version"] == 0 and s["jobs"] == 0 and s["pool"] == {"tasks": 0, "training": 0, "held_out": 0}
    assert s["settings"] == {"lr": 0.05, "momentum": 0.5, "param_groups": None, "boundaries": None}
    assert s["hyperparameters"]["per_layer"] is True and s["holdout_every"] == 3 and s["kind"] is None
    assert client.get(f"/v1/studies/{s['id']}").json() == s
    listed = client.get("/v1/studies").json()
    assert listed["total"] == 1 and [i["id"] for i in listed["items"]] == [s["id"]]
    body = client.get(f"/v1/studies/{s['id']}/settings").json()
    assert body == {"lr": 0.05, "momentum": 0.5, "study_id": s["id"], "version": 0}
    assert client.get(f"/v1/studies/{s['id']}/history").json() == {"study_id": s["id"], "items": []}


def test_bad_study_bodies_name_the_field(client):
    assert _fields(client.post("/v1/studies", json={"holdout_every": 1})) == ["holdout_every"]
    assert _fields(client.post("/v1/studies", json={"meta": {"meta_batch": 0}})) == ["meta.meta_batch"]
    assert _fields(client.post("/v1/studies", json={"surprise": 1})) == ["surprise"]
    for bad in (0, 1025):
        assert _fields(client.post("/v1/studies", json={"meta": {"eval_tasks": bad}})) == ["meta.eval_tasks"]
    assert _study(client)["meta"]["eval_tasks"] == 64
    assert _study(client, meta={"eval_tasks": 1024})["meta"]["eval_tasks"] == 1024


def test_an_evaluation_recorded_before_its_counts_says_it_covered_every_task_it_lists(app, client):
    """Older updates evaluated every held-out task (whose data loaded): the settings say so."""
    s = _study(client)
    row = {"job_id": "j", "task_index": 0, "name": "t", "val_loss": 1.0, "start_val_loss": 2.0}
    old = {"tasks": [row, {**row, "task_index": 1}], "mean_val_loss": 1.0, "mean_start_val_loss": 2.0, "draws": [0]}
    with app.state.sessionmaker() as db:
        db.get(Study, s["id"]).evaluation = old
        db.commit()
    ev = client.get(f"/v1/studies/{s['id']}/settings").json()["evaluation"]
    assert (ev["held_out"], ev["evaluated"]) == (2, 2) and ev["tasks"][1]["task_index"] == 1


def test_another_tenants_study_is_not_found_and_cannot_be_joined(app, client):
    s = _study(client)
    with keyed_client(app, tenant="team-b") as other:
        for path in ("", "/settings", "/history"):
            r = other.get(f"/v1/studies/{s['id']}{path}")
            assert r.status_code == 404 and s["id"] in r.json()["detail"]
        assert other.get("/v1/studies").json()["total"] == 0
        r = other.post("/v1/jobs", json=_in_study(s["id"]))
        assert _fields(r) == ["study"] and "not found" in r.json()["detail"][0]["msg"]
    with keyed_client(app, tenant="ops", admin=True) as admin:  # an admin key reads every tenant's
        assert admin.get(f"/v1/studies/{s['id']}").status_code == 200
        assert admin.get("/v1/studies").json()["total"] == 1


def test_jobs_join_the_pool_every_kth_task_held_out(app, client):
    s = _study(client, holdout_every=2)
    ids = []
    for n in (3, 2):
        r = client.post("/v1/jobs", json=_in_study(s["id"], *[INLINE_TASK] * n))
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    with app.state.sessionmaker() as db:
        pool = db.execute(
            select(StudyTask.position, StudyTask.job_id, StudyTask.task_index, StudyTask.held_out)
            .where(StudyTask.study_id == s["id"])
            .order_by(StudyTask.position)
        ).all()
        spec = db.get(Job, ids[0]).spec
    assert [tuple(p) for p in pool] == [
        (0, ids[0], 0, False),
        (1, ids[0], 1, True),
        (2, ids[0], 2, False),
        (3, ids[1], 0, True),
        (4, ids[1], 1, False),
    ]
    assert spec["study"] == s["id"] and spec["hyperparameters"]["lr"] == 0.01
    got = client.get(f"/v1/studies/{s['id']}").json()
    assert got["pool"] == {"tasks": 5, "training": 3, "held_out": 2} and got["jobs"] == 2
    assert got["kind"] == {"model": "mlp", "loss": "cross_entropy"}


def test_a_job_that_does_not_fit_gets_a_422_naming_what_differs(app, client, nothing_changed):
    s = _study(client, hyperparameters={"per_layer": True, "schedule_segments": 2})
    assert client.post("/v1/jobs", json=_in_study(s["id"])).status_code == 202
    deeper = copy.deepcopy(INLINE_TASK)
    deeper["model"]["hidden"] = [4, 4]
    longer = copy.deepcopy(INLINE_TASK)
    longer["steps"] = 12
    mse = copy.deepcopy(INLINE_TASK)
    mse["loss"] = "mse"
    with app.state.sessionmaker() as db:
        before = db.scalar(select(Study.pool_size).where(Study.id == s["id"]))
    r = client.post("/v1/jobs", json=_in_study(s["id"], INLINE_TASK, deeper, longer, mse))
    assert _fields(r) == ["tasks[1].model", "tasks[2].steps", "tasks[3].loss"]
    msgs = [e["msg"] for e in r.json()["detail"]]
    assert "layers 2; this task's layers is 3" in msgs[0] and "steps 10; this task's steps is 12" in msgs[1]
    body = _in_study(s["id"])
    body["hyperparameters"] = {"per_layer": False}
    r = client.post("/v1/jobs", json=body)
    assert _fields(r) == ["hyperparameters.per_layer", "hyperparameters.schedule_segments"]
    with app.state.sessionmaker() as db:  # nothing joined
        assert db.scalar(select(Study.pool_size).where(Study.id == s["id"])) == before


def test_a_job_starts_warm_from_the_studys_learned_settings(app, client):
    s = _study(client)
    learned = {"lr": 0.2, "momentum": 0.6}
    with app.state.sessionmaker() as db:
        db.get(Study, s["id"]).settings = learned
        db.commit()
    r = client.post("/v1/jobs", json=_in_study(s["id"], meta={"iterations": 9, "seed": 0}))
    assert r.status_code == 202, r.text
    job = r.json()
    # it starts from the study's settings, with half its iterations (rounded up)
    assert (job["progress"]["lr"], job["progress"]["momentum"]) == (0.2, 0.6)
    assert job["progress"]["iterations"] == 5
    with app.state.sessionmaker() as db:
        link = db.get(StudyJob, job["id"])
        assert link.warm is True and link.start == learned and link.version is None
        assert db.get(Job, job["id"]).spec["meta"]["iterations"] == 5


def test_a_warm_job_that_left_its_search_to_the_defaults_runs_the_short_line_search(app, client):
    """A cold job of the pair defaults to the stencil (40 iterations); warm, it starts at settings the
    study learned on its pool and runs WARM_LINE_ITERATIONS of the line search instead; a job that
    chose its search keeps it with half its iterations (the test above)."""
    s = _study(client)
    cold = client.post("/v1/jobs", json=_in_study(s["id"], meta={"seed": 0})).json()
    assert cold["progress"]["iterations"] == STENCIL_ITERATIONS
    with app.state.sessionmaker() as db:
        assert db.get(Job, cold["id"]).spec["meta"]["search"] == "stencil"
        db.get(Study, s["id"]).settings = {"lr": 0.2, "momentum": 0.6}
        db.commit()
    warm = client.post("/v1/jobs", json=_in_study(s["id"], meta={"seed": 0})).json()
    assert warm["progress"]["iterations"] == WARM_LINE_ITERATIONS
    chose = client.post("/v1/jobs", json=_in_study(s["id"], meta={"seed": 0, "search": "stencil"})).json()
    with app.state.sessionmaker() as db:
        assert db.get(Job, warm["id"]).spec["meta"]["search"] == "line"
        assert db.get(Job, chose["id"]).spec["meta"]["search"] == "stencil"
    assert chose["progress"]["iterations"] == STENCIL_ITERATIONS // 2


def test_a_job_in_a_per_layer_study_gets_the_richer_defaults_and_is_admitted_as_such(app, client):
    """The job gives no hyperparameters: meta.search and meta.iterations were defaulted for a constant
    pair, but it runs the study's per-layer values, so it takes their defaults (line search, 13)."""
    s = _study(client, hyperparameters={"per_layer": True})
    body = _in_study(s["id"], INLINE_TASK)
    del body["meta"]
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    with app.state.sessionmaker() as db:
        spec = db.get(Job, r.json()["id"]).spec
    assert spec["hyperparameters"]["per_layer"] is True
    assert (spec["meta"]["search"], spec["meta"]["iterations"]) == ("line", 13)
    # what the body gives is kept; what it leaves out follows the study's per-layer values
    for meta, want in (
        ({"iterations": 6, "search": "stencil"}, ("stencil", 6)),
        ({"search": "line"}, ("line", 13)),
        ({"iterations": 10}, ("line", 10)),
        ({"search": "stencil"}, ("stencil", STENCIL_ITERATIONS)),
    ):
        given = _in_study(s["id"], INLINE_TASK, meta=meta)
        r = client.post("/v1/jobs", json=given)
        assert r.status_code == 202, r.text
        with app.state.sessionmaker() as db:
            spec = db.get(Job, r.json()["id"]).spec
        assert (spec["meta"]["search"], spec["meta"]["iterations"]) == want, meta
    # warm (the study has learned): the short rich line search, or half of what the body gave
    with app.state.sessionmaker() as db:
        db.get(Study, s["id"]).settings = {"lr": 0.2, "momentum": 0.6}
        db.commit()
    for meta, want in (({}, ("line", WARM_RICH_ITERATIONS)), ({"iterations": 10}, ("line", 5))):
        r = client.post("/v1/jobs", json=_in_study(s["id"], INLINE_TASK, meta={"seed": 0, **meta}))
        assert r.status_code == 202, r.text
        with app.state.sessionmaker() as db:
            spec = db.get(Job, r.json()["id"]).spec
        assert (spec["meta"]["search"], spec["meta"]["iterations"]) == want, meta


@contextmanager
def job_statements() -> Iterator[list[str]]:
    """The SQL statements any engine runs meanwhile that read the jobs or study_jobs tables."""
    seen: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        if "jobs" in statement:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def _ids(page: dict) -> list[str]:
    return [j["id"] for j in page["items"]]


def test_a_jobs_study_shows_in_its_views_and_filters_the_listing(client):
    s, other = _study(client), _study(client)
    plain = client.post("/v1/jobs", json=job_body()).json()
    assert plain["study"] is None
    first, second = (client.post("/v1/jobs", json=_in_study(s["id"])) for _ in range(2))
    assert first.status_code == second.status_code == 202 and first.json()["study"] == s["id"]
    a, b = first.json()["id"], second.json()["id"]
    assert client.get(f"/v1/jobs/{a}").json()["study"] == s["id"]
    assert client.get(f"/v1/jobs/{plain['id']}").json()["study"] is None
    listed = {j["id"]: j["study"] for j in client.get("/v1/jobs").json()["items"]}
    assert listed == {a: s["id"], b: s["id"], plain["id"]: None}
    page = client.get("/v1/jobs", params={"study": s["id"]}).json()
    assert _ids(page) == [b, a] and page["total"] == 2
    page = client.get("/v1/jobs", params={"study": s["id"], "limit": 1, "offset": 1}).json()
    assert _ids(page) == [a] and page["total"] == 2 and page["items"][0]["study"] == s["id"]
    assert client.get("/v1/jobs", params={"study": other["id"]}).json()["items"] == []
    assert client.get("/v1/jobs", params={"study": "no-such-study"}).json()["total"] == 0
    assert client.get("/v1/jobs", params={"study": "x" * 65}).status_code == 422
    cancelled = client.post(f"/v1/jobs/{a}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["study"] == s["id"]
    assert _ids(client.get("/v1/jobs", params={"study": s["id"], "status": "queued"}).json()) == [b]
    assert _ids(client.get("/v1/jobs", params={"study": s["id"], "status": "cancelled"}).json()) == [a]
    with client.stream("GET", f"/v1/jobs/{a}/events") as r:  # a finished job: its status, then the end
        (event,) = parse_sse(r.iter_lines())
    assert event.event == "status" and event.data["study"] == s["id"]
    with job_statements() as seen:  # the status poll reads the job and its study in one query
        assert client.get(f"/v1/jobs/{a}").json() == event.data
    assert len(seen) == 1 and "study_jobs" in seen[0]


def test_the_study_filter_keeps_to_the_tenants_the_key_lists(app, client):
    s = _study(client)
    joined = client.post("/v1/jobs", json=_in_study(s["id"])).json()["id"]
    with keyed_client(app, tenant="team-b") as other:
        other.post("/v1/jobs", json=job_body())
        assert other.get("/v1/jobs", params={"study": s["id"]}).json() == {
            "items": [],
            "total": 0,
            "limit": 20,
            "offset": 0,
        }
        assert other.get("/v1/jobs", params={"study": s["id"], "tenant": "default"}).status_code == 403
    with keyed_client(app, tenant="ops", admin=True) as admin:  # an admin key lists every tenant's
        assert _ids(admin.get("/v1/jobs", params={"study": s["id"]}).json()) == [joined]
        assert _ids(admin.get("/v1/jobs", params={"study": s["id"], "tenant": "default"}).json()) == [joined]
        assert admin.get("/v1/jobs", params={"study": s["id"], "tenant": "team-b"}).json()["total"] == 0
        assert admin.get(f"/v1/jobs/{joined}").json()["study"] == s["id"]
