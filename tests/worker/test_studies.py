"""Studies through the runner in-process (no Celery): jobs of a study train on their tasks that are
not held out, start warm once the study has learned, and each succeeded job updates the study once;
no held-out task is ever passed to a training or meta-learning call, across several jobs."""

from __future__ import annotations

import pytest

from service import studies
from service.db.models import StudyTask
from service.db.session import session_scope
from tests.e2e.conftest import small_job
from tests.worker.test_runner import _drain, env  # noqa: F401 - the fixture
from worker import engine, runner, study_runner
from worker.engine import study as engine_study


def _job(study_id: str, j: int, tasks: int = 3) -> dict:
    body = small_job(iterations=2, tasks=tasks, steps=10)
    for i, task in enumerate(body["tasks"]):
        task["name"] = f"j{j}t{i}"
        task["data"]["seed"] = 10 * j + i
    del body["hyperparameters"]  # the study's
    body["study"] = study_id
    return body


@pytest.fixture
def seen(monkeypatch):
    """The names of the tasks every training or meta-learning call is given: the jobs' run_meta,
    the study's run_meta and its checks (which choose settings by those tasks' training loss)."""
    names: set[str] = set()

    def spy(fn):
        def wrapped(tasks, *args, **kwargs):
            names.update(t.name for t in tasks)
            return fn(tasks, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(engine, "run_meta", spy(engine.run_meta))
    monkeypatch.setattr(engine_study, "run_meta", spy(engine_study.run_meta))
    monkeypatch.setattr(engine_study, "_check_loss", spy(engine_study._check_loss))
    return names


def test_no_held_out_task_is_ever_trained_on_and_each_job_updates_the_study_once(env, seen, monkeypatch):  # noqa: F811
    client, sent = env
    updates: list[tuple[str, str]] = []
    monkeypatch.setattr(study_runner, "enqueue_update", lambda s, j: updates.append((s, j)))
    r = client.post(
        "/v1/studies",
        json={"name": "iris", "holdout_every": 4, "meta": {"meta_batch": 4, "rounds": 2, "iterations": 2}},
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    jobs = []
    for j in range(3):  # 9 tasks: positions 3 and 7 held out
        r = client.post("/v1/jobs", json=_job(sid, j))
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        jobs.append(jid)
        sent.append((jid, 0))
        assert _drain(sent)[-1] == "succeeded"
        assert updates[-1] == (sid, jid)
        assert study_runner.update_study(sid, jid, runner.build_tasks) == "recorded"
        assert study_runner.update_study(sid, jid, runner.build_tasks) == "skipped"  # a retried message records nothing
        if j > 0:  # it started from the study's settings, warm, with half the iterations
            job = client.get(f"/v1/jobs/{jid}").json()
            assert job["progress"]["iterations"] == 1
    with session_scope() as db:
        rows = db.query(StudyTask).filter_by(study_id=sid).order_by(StudyTask.position).all()
        held = {f"j{jobs.index(r.job_id)}t{r.task_index}" for r in rows if r.held_out}
        everything = {f"j{jobs.index(r.job_id)}t{r.task_index}" for r in rows}
    assert [r.position for r in rows if r.held_out] == [3, 7]
    assert held == {"j1t0", "j2t1"}
    # The proof: every training call saw only training tasks, and saw all of them.
    assert seen and seen.isdisjoint(held), seen & held
    assert seen == everything - held
    # Held-out tasks are evaluated, not trained on: the study's settings report them.
    body = client.get(f"/v1/studies/{sid}/settings").json()
    assert body["version"] == 3
    assert {t["name"] for t in body["evaluation"]["tasks"]} == held
    assert body["evaluation"]["mean_val_loss"] is not None
    hist = client.get(f"/v1/studies/{sid}/history").json()["items"]
    assert [h["version"] for h in hist] == [1, 2, 3] and [h["job_id"] for h in hist] == jobs
    assert [h["pool"]["held_out"] for h in hist] == [0, 1, 2]
    assert all(p not in (3, 7) for h in hist for r in h["rounds"] for p in r["batch"] + r["check"])
    # A job's own settings body covers the tasks it trained on.
    ev = client.get(f"/v1/jobs/{jobs[1]}/settings").json()["evaluation"]
    assert [t["name"] for t in ev["tasks"]] == ["j1t1", "j1t2"]
    study = client.get(f"/v1/studies/{sid}").json()
    assert study["pool"] == {"tasks": 9, "training": 7, "held_out": 2} and study["jobs"] == 3


def test_an_update_computed_from_settings_that_changed_meanwhile_is_stale(env, monkeypatch):  # noqa: F811
    client, sent = env
    monkeypatch.setattr(study_runner, "enqueue_update", lambda s, j: None)
    sid = client.post("/v1/studies", json={"meta": {"rounds": 1, "iterations": 1}}).json()["id"]
    jid = client.post("/v1/jobs", json=_job(sid, 0, tasks=2)).json()["id"]
    sent.append((jid, 0))
    _drain(sent)
    with session_scope() as db:
        outcome = studies.record_update(
            db,
            study_id=sid,
            job_id=jid,
            expected_version=7,
            settings={"lr": 1.0, "momentum": 0.0},
            evaluation=None,
            update={},
            rounds=0,
        )
    assert outcome == "stale"
    assert study_runner.update_study(sid, jid, runner.build_tasks) == "recorded"
    assert client.get(f"/v1/studies/{sid}").json()["version"] == 1


def test_a_job_whose_only_task_is_held_out_trains_on_nothing(env, seen, monkeypatch):  # noqa: F811
    client, sent = env
    monkeypatch.setattr(study_runner, "enqueue_update", lambda s, j: None)
    sid = client.post("/v1/studies", json={"holdout_every": 2}).json()["id"]
    first = client.post("/v1/jobs", json=_job(sid, 0, tasks=1)).json()["id"]
    second = client.post("/v1/jobs", json=_job(sid, 1, tasks=1)).json()["id"]  # position 1: held out
    sent += [(first, 0), (second, 0)]
    _drain(sent)
    assert "j1t0" not in seen and "j0t0" in seen
    body = client.get(f"/v1/jobs/{second}/settings").json()
    assert client.get(f"/v1/jobs/{second}").json()["status"] == "succeeded"
    # nothing learned: the study's starting values, evaluated on the held-out task
    assert (body["lr"], body["momentum"]) == (pytest.approx(0.01), pytest.approx(0.9))
    assert [t["name"] for t in body["evaluation"]["tasks"]] == ["j1t0"]
    assert runner.task_seed(0, 0) == body["evaluation"]["tasks"][0]["seed"]


def test_a_warm_job_of_a_per_layer_study_starts_its_table_from_the_studys(env, monkeypatch):  # noqa: F811
    """The study's learned per-layer values reach the job's search: its richer phase's first record
    compares them with the job's constant pair (engine init_state's ``table``)."""
    from service.db.models import Job, JobIteration, Study
    from service.schemas import JobCreate

    client, sent = env
    monkeypatch.setattr(study_runner, "enqueue_update", lambda s, j: None)
    sid = client.post("/v1/studies", json={"hyperparameters": {"per_layer": True}}).json()["id"]
    groups = [
        {"params": ["0.weight", "0.bias"], "lr": [0.3], "momentum": [0.8]},
        {"params": ["2.weight", "2.bias"], "lr": [0.05], "momentum": [0.6]},
    ]
    with session_scope() as db:
        db.get(Study, sid).settings = {"lr": 0.1, "momentum": 0.7, "param_groups": groups, "boundaries": [0]}
    body = _job(sid, 0, tasks=2)
    body["meta"] = {"iterations": 4, "seed": 0}  # warm: 2, the table starts at the 2nd
    jid = client.post("/v1/jobs", json=body).json()["id"]
    sent.append((jid, 0))
    assert _drain(sent)[-1] == "succeeded"
    with session_scope() as db:
        rows = db.query(JobIteration).filter_by(job_id=jid).order_by(JobIteration.iteration).all()
        starts = [(r.extra, r.lr, r.momentum) for r in rows if (r.extra or {}).get("phase") == "rich_start"]
    assert len(starts) == 1
    start, lr, momentum = starts[0]
    # which was lower, by plain torch.optim.SGD on the job's tasks and training draws
    with session_scope() as db:
        spec = db.get(Job, jid).spec
    tasks = runner.build_tasks(JobCreate.model_validate(spec))
    pair = [{**g, "lr": [lr], "momentum": [momentum]} for g in groups]  # the best constant pair, every group
    draws = list(engine.MetaConfig().draws)
    ref_pair, ref_table = (engine.evaluate_groups(tasks, g, [0], draws)["mean_val_loss"] for g in (pair, groups))
    lower = ref_table < ref_pair
    assert start["start_table"] == ("started from it" if lower else "the constant pair was lower")
    assert start["group_lr"] == [pytest.approx(g["lr"]) for g in (groups if lower else pair)]


def _pool(client, sid: str, jobs: int) -> list[str]:
    """``jobs`` jobs of 2 tasks joined to the study and marked succeeded (not run: an update needs
    only their specs), in order."""
    from service.db.models import Job

    ids = [client.post("/v1/jobs", json=_job(sid, j, tasks=2)).json()["id"] for j in range(jobs)]
    with session_scope() as db:
        for jid in ids:
            db.get(Job, jid).status = "succeeded"
    return ids


def _spy_build(fail: str | None = None):
    """runner.build_tasks, recording the job of each call; ``fail``'s data cannot be loaded."""
    from worker.dataset_loader import DatasetUnavailable

    calls: list[str] = []

    def build(job, *args, **kwargs):
        name = job.tasks[0].name  # "j{j}t0"
        calls.append(name.split("t")[0])
        if name.split("t")[0] == fail:
            raise DatasetUnavailable("gone")
        return runner.build_tasks(job, *args, **kwargs)

    return build, calls


TINY = {"meta_batch": 1, "rounds": 1, "iterations": 1, "check_tasks": 1, "eval_tasks": 2}


def test_an_update_builds_only_the_jobs_its_batches_checks_and_first_held_out_tasks_use(env, monkeypatch):  # noqa: F811
    client, _ = env
    monkeypatch.setattr(study_runner, "enqueue_update", lambda s, j: None)
    sid = client.post("/v1/studies", json={"holdout_every": 3, "meta": TINY}).json()["id"]
    ids = _pool(client, sid, 6)  # 12 tasks: positions 2, 5, 8, 11 held out (j1t0, j2t1, j4t0, j5t1)
    build, calls = _spy_build()
    assert study_runner.update_study(sid, ids[-1], build) == "recorded"
    training = [p for p in range(12) if p % 3 != 2]
    batch = engine_study.draw_batch(len(training), 1, 0, 0)
    check = engine_study._check_indices(len(training), batch, 1, 0, 0)
    (r,) = client.get(f"/v1/studies/{sid}/history").json()["items"][0]["rounds"]
    assert (r["batch"], r["check"]) == ([training[i] for i in batch], [training[i] for i in check])
    touched = {f"j{p // 2}" for p in r["batch"] + r["check"]} | {"j1", "j2"}  # + the first 2 held-out tasks' jobs
    assert sorted(calls) == sorted(touched)  # each once (a job's training and held-out tasks share one build)
    assert len(touched) < 6 and "j4" not in calls and "j5" not in calls
    update = client.get(f"/v1/studies/{sid}/history").json()["items"][0]
    assert update["pool"] == {"tasks": 12, "training": 8, "held_out": 4}
    assert update["held_out_evaluated"] == 2 and update["unavailable"] == []
    ev = client.get(f"/v1/studies/{sid}/settings").json()["evaluation"]
    assert [t["name"] for t in ev["tasks"]] == ["j1t0", "j2t1"]  # the first 2 by position, every update
    assert (ev["held_out"], ev["evaluated"]) == (4, 2)
    assert update["held_out_mean_val_loss"] == ev["mean_val_loss"]


def test_a_job_whose_data_cannot_be_loaded_is_left_out_of_the_update_it_is_found_in(env, monkeypatch):  # noqa: F811
    """Found when relearn first needs one of its tasks: the update learns again over the others
    (batches drawn over them, positions kept), does not evaluate its held-out tasks and names it."""
    client, _ = env
    monkeypatch.setattr(study_runner, "enqueue_update", lambda s, j: None)
    sid = client.post("/v1/studies", json={"holdout_every": 3, "meta": {**TINY, "seed": 1}}).json()["id"]
    ids = _pool(client, sid, 6)
    training = [p for p in range(12) if p % 3 != 2]
    assert training[engine_study.draw_batch(8, 1, 1, 0)[0]] == 3  # seed 1's first batch: j1t1, j1's training task
    build, calls = _spy_build(fail="j1")
    assert study_runner.update_study(sid, ids[-1], build) == "recorded"
    assert calls.count("j1") == 1
    kept = [p for p in training if p != 3]
    batch = engine_study.draw_batch(len(kept), 1, 1, 0)
    check = engine_study._check_indices(len(kept), batch, 1, 1, 0)
    update = client.get(f"/v1/studies/{sid}/history").json()["items"][0]
    (r,) = update["rounds"]
    assert (r["batch"], r["check"]) == ([kept[i] for i in batch], [kept[i] for i in check])
    assert update["unavailable"] == [ids[1]] and update["note"] is None
    ev = client.get(f"/v1/studies/{sid}/settings").json()["evaluation"]
    assert [t["name"] for t in ev["tasks"]] == ["j2t1"]  # the first 2 held-out tasks, j1t0 not replaced
    assert (ev["held_out"], ev["evaluated"]) == (4, 1) and update["held_out_evaluated"] == 1
