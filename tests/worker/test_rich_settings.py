"""Per-layer and scheduled settings through the job API: validation, the runner, the settings body."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.conftest import small_job
from tests.worker.test_runner import _drain, env  # noqa: F401  (fixture)
from worker import engine


def _job(**hyper):
    job = small_job(iterations=6, tasks=2, steps=20)
    job["hyperparameters"].update(hyper)
    return job


def test_per_layer_schedule_job_returns_param_groups_that_torch_sgd_reproduces(env):  # noqa: F811
    client, sent = env
    r = client.post("/v1/jobs", json=_job(per_layer=True, schedule_segments=2))
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    sent.append((jid, 0))
    assert _drain(sent)[-1] == "succeeded"
    body = client.get(f"/v1/jobs/{jid}/settings").json()
    groups = body["param_groups"]
    # Named exactly as named_parameters() of the equivalent nn.Sequential(Linear, Tanh, Linear).
    assert [g["params"] for g in groups] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert body["boundaries"] == [0, 10]
    lo, hi = 1e-5, 10.0
    for g in groups:
        assert len(g["lr"]) == len(g["momentum"]) == 2
        assert all(lo <= v <= hi for v in g["lr"]) and all(0 <= m <= 0.999 for m in g["momentum"])
    assert body["method"] in engine.METHODS and body["method_reason"]
    ev = body["evaluation"]
    assert ev["mean_learned_groups_val_loss"] is not None
    # The reported loss is plain torch.optim.SGD with those groups: recompute it with the recipe.
    from service.schemas import JobCreate
    from worker import runner

    tasks = runner.build_tasks(JobCreate.model_validate(_job(per_layer=True, schedule_segments=2)), torch.device("cpu"))
    ref = engine.evaluate_groups(tasks, groups, body["boundaries"], ev["draws"])
    assert ev["mean_learned_groups_val_loss"] == pytest.approx(ref["mean_val_loss"], rel=1e-6)
    assert ev["tasks"][0]["learned_groups_val_loss"] == pytest.approx(ref["tasks"][0]["val_loss"], rel=1e-6)


def test_method_is_passed_to_the_engine_and_recorded(env):  # noqa: F811
    client, sent = env
    job = _job()
    job["meta"].update(method="forward")
    jid = client.post("/v1/jobs", json=job).json()["id"]
    sent.append((jid, 0))
    assert _drain(sent)[-1] == "succeeded"
    body = client.get(f"/v1/jobs/{jid}/settings").json()
    assert body["method"] == "forward" and "param_groups" not in body and "boundaries" not in body
    hist = client.get(f"/v1/jobs/{jid}/history").json()["items"]
    assert len(hist) == 6


@pytest.mark.parametrize(
    "change, loc, words",
    [
        (
            lambda j: (j["hyperparameters"].update(per_layer=True), j["tasks"][1]["model"].update(hidden=[4, 4])),
            ["body", "hyperparameters", "per_layer"],
            "same number of layers",
        ),
        (
            lambda j: (j["hyperparameters"].update(schedule_segments=2), j["tasks"][1].update(steps=30)),
            ["body", "hyperparameters", "schedule_segments"],
            "same steps",
        ),
        (
            lambda j: j["hyperparameters"].update(schedule_segments=21),
            ["body", "hyperparameters", "schedule_segments"],
            "more than the 20 steps",
        ),
        (lambda j: j["meta"].update(method="adam"), ["body", "meta", "method"], "auto"),
    ],
)
def test_rich_settings_that_cannot_work_are_422_with_the_field(env, change, loc, words):  # noqa: F811
    client, sent = env
    job = _job()
    change(job)
    r = client.post("/v1/jobs", json=job)
    assert r.status_code == 422, r.text
    (err,) = [e for e in r.json()["detail"] if e["loc"] == loc]
    assert words in err["msg"]
    assert client.get("/v1/jobs").json()["total"] == 0 and sent == []


def test_the_client_recipe_trains_exactly_like_the_engines_reference(env):  # noqa: F811
    """TunedSettings.sgd(model) + apply_schedule, and the printed python code, equal train_sgd_groups."""
    import torch.nn.functional as F

    from gradtune.client import TunedSettings
    from service.schemas import JobCreate
    from worker import runner
    from worker.engine.reference import train_sgd_groups

    client, sent = env
    job = _job(per_layer=True, schedule_segments=3)
    job["meta"]["search"] = "stencil"  # its groups beat the pair here (the recipe needs param_groups back)
    jid = client.post("/v1/jobs", json=job).json()["id"]
    sent.append((jid, 0))
    assert _drain(sent)[-1] == "succeeded"
    s = TunedSettings.from_body(client.get(f"/v1/jobs/{jid}/settings").json())
    (task, _) = runner.build_tasks(JobCreate.model_validate(job), torch.device("cpu"))
    # Make the groups differ per layer and segment, so a mix-up could not go unnoticed.
    s.param_groups[0]["lr"] = [0.05, 0.02, 0.01]
    s.param_groups[1]["momentum"] = [0.9, 0.5, 0.1]
    draw = 7

    def train(make_opt, schedule):
        model = engine.build_model(task, draw)
        opt = make_opt(model)
        for step, idx in enumerate(engine.batch_indices(task, draw)):
            schedule(opt, step)
            opt.zero_grad()
            F.cross_entropy(model(task.x_train[idx]), task.y_train[idx]).backward()
            opt.step()
        with torch.no_grad():
            return F.cross_entropy(model(task.x_val), task.y_val).item()

    ref = train_sgd_groups(task, s.param_groups, s.boundaries, draw)
    assert train(s.sgd, s.apply_schedule) == pytest.approx(ref, rel=1e-6)

    def from_code(model):
        ns = {"model": model}
        exec(s.python(), ns)
        from_code.ns = ns
        return ns["optimizer"]

    assert train(from_code, lambda opt, step: from_code.ns["apply_schedule"](step)) == pytest.approx(ref, rel=1e-6)
    # The constant pair stays available for users who want one.
    constant = train(lambda m: s.sgd(m, constant=True), lambda opt, step: None)
    assert constant == pytest.approx(engine.train_sgd(task, s.lr, s.momentum, draw), rel=1e-6)
    assert constant != pytest.approx(ref, rel=1e-3)
