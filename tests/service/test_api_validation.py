"""Bad input gets a clear answer and changes nothing (issue 2).

Every case asserts the status code, the field path and the reason, and that no job row and no
queue message appeared. Runs on SQLite and PostgreSQL (db_url).
"""

from __future__ import annotations

import json
import re

import pytest

from service.main import create_app
from tests.helpers.support import keyed_client
from tests.service.conftest import BUILTIN_TASK, INLINE_TASK, count_jobs, enqueued, job_body


def post_raw(client, text: str | bytes, **headers):
    return client.post("/v1/jobs", content=text, headers={"content-type": "application/json", **headers})


def only_error(r, status: int = 422) -> dict:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and len(detail) == 1, detail
    return detail[0]


def errors_by_field(r) -> dict[str, dict]:
    assert r.status_code == 422, r.text
    return {e["field"]: e for e in r.json()["detail"]}


# ------------------------------------------------------------------ body format


def test_malformed_json_is_400_with_position(client, nothing_changed):
    r = post_raw(client, '{"name": "x",\n "tasks": [1,,]}')
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    assert detail.startswith("the request body is not valid JSON: Expecting value")
    assert detail.endswith("at line 2 column 14 (char 27)")  # as json.loads reports it
    nothing_changed()


def test_truncated_json_is_400(client, nothing_changed):
    r = post_raw(client, '{"tasks": [')
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["detail"]
    nothing_changed()


def test_body_not_an_object(client, nothing_changed):
    e = only_error(post_raw(client, "[1, 2]"))
    assert e["loc"] == ["body"] and e["field"] == "body"
    nothing_changed()


def test_non_json_content_type_is_415_and_says_how(client, nothing_changed):
    r = client.post(
        "/v1/jobs", content=json.dumps(job_body()), headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 415, r.text
    assert "Content-Type: application/json" in r.json()["detail"]
    nothing_changed()


def test_unknown_field_is_refused(client, nothing_changed):
    body = job_body()
    body["tasks"][0]["lerning_rate"] = 0.1
    e = only_error(client.post("/v1/jobs", json=body))
    assert e["loc"] == ["body", "tasks", 0, "lerning_rate"]
    assert e["type"] == "extra_forbidden"
    nothing_changed()


# ------------------------------------------------------------------ tasks


def test_no_tasks(client, nothing_changed):
    e = only_error(client.post("/v1/jobs", json=job_body() | {"tasks": []}))
    assert e["loc"] == ["body", "tasks"] and e["field"] == "tasks"
    assert "at least 1" in e["msg"]
    nothing_changed()


def test_missing_tasks(client, nothing_changed):
    e = only_error(client.post("/v1/jobs", json={"name": "x"}))
    assert e["loc"] == ["body", "tasks"] and e["type"] == "missing"
    nothing_changed()


def test_too_many_tasks(client, nothing_changed, settings):
    n = settings.max_tasks + 1
    e = only_error(client.post("/v1/jobs", json=job_body(*[BUILTIN_TASK] * n)))
    assert e["loc"] == ["body", "tasks"]
    assert e["msg"] == f"a job may have at most {settings.max_tasks} tasks, this one has {n}"
    assert e["type"] == "too_many_tasks"
    nothing_changed()


def test_max_tasks_is_accepted(client, settings):
    r = client.post("/v1/jobs", json=job_body(*[BUILTIN_TASK] * settings.max_tasks))
    assert r.status_code == 202, r.text


@pytest.mark.parametrize(
    "path, value, loc, needle",
    [
        (("loss",), "hinge", ["tasks", 0, "loss"], "'cross_entropy' or 'mse'"),
        (("model", "activation"), "swish", ["tasks", 0, "model", "activation"], "'tanh'"),
        (("model", "kind"), "resnet", ["tasks", 0, "model", "kind"], "'mlp'"),
        (("steps",), 0, ["tasks", 0, "steps"], "greater than 0"),
        (("steps",), -5, ["tasks", 0, "steps"], "greater than 0"),
        (("batch_size",), 0, ["tasks", 0, "batch_size"], "greater than 0"),
        (("batch_size",), -1, ["tasks", 0, "batch_size"], "greater than 0"),
        (("steps",), 2.5, ["tasks", 0, "steps"], "integer"),
    ],
)
def test_bad_task_field(client, nothing_changed, path, value, loc, needle):
    body = job_body()
    target = body["tasks"][0]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    e = only_error(client.post("/v1/jobs", json=body))
    assert e["loc"] == ["body", *loc]
    assert e["field"] == "tasks[0]." + ".".join(loc[2:])
    assert needle in e["msg"]
    nothing_changed()


def test_unknown_builtin_dataset(client, nothing_changed):
    task = dict(BUILTIN_TASK, data={"source": "builtin", "name": "mnist"})
    e = only_error(client.post("/v1/jobs", json=job_body(task)))
    assert e["loc"] == ["body", "tasks", 0, "data", "name"]  # no union tag in the path
    assert e["field"] == "tasks[0].data.name"
    assert "'digits'" in e["msg"] and "'diabetes'" in e["msg"]
    nothing_changed()


def test_unknown_data_source(client, nothing_changed):
    task = dict(BUILTIN_TASK, data={"source": "s3", "name": "digits"})
    e = only_error(client.post("/v1/jobs", json=job_body(task)))
    assert e["loc"] == ["body", "tasks", 0, "data"]
    assert "'inline', 'builtin'" in e["msg"]
    nothing_changed()


def test_steps_over_the_limit(client, nothing_changed, settings):
    task = dict(BUILTIN_TASK, steps=settings.max_steps + 1, model={"kind": "mlp", "hidden": []})
    e = only_error(client.post("/v1/jobs", json=job_body(task)))
    assert e["loc"] == ["body", "tasks", 0, "steps"]
    assert e["msg"] == f"steps {settings.max_steps + 1} is above the limit of {settings.max_steps}"
    nothing_changed()


def test_iterations_over_the_limit(client, nothing_changed, settings):
    body = job_body(meta={"iterations": settings.max_iterations + 1})
    e = only_error(client.post("/v1/jobs", json=body))
    assert e["loc"] == ["body", "meta", "iterations"] and e["field"] == "meta.iterations"
    assert f"above the limit of {settings.max_iterations}" in e["msg"]
    nothing_changed()


# ------------------------------------------------------------------ batch size vs data


def test_batch_larger_than_inline_training_set(client, nothing_changed):
    task = dict(INLINE_TASK, batch_size=7)  # 6 training rows
    e = only_error(client.post("/v1/jobs", json=job_body(task)))
    assert e["loc"] == ["body", "tasks", 0, "batch_size"]
    assert e["msg"].startswith("batch_size 7 is larger than the training set (6 rows)")
    assert e["type"] == "batch_too_large"
    nothing_changed()


def test_batch_larger_than_builtin_training_set(client, nothing_changed):
    # iris: 150 rows, val_fraction 0.2 -> 30 validation rows, 120 training rows.
    data = {"source": "builtin", "name": "iris", "val_fraction": 0.2, "seed": 0}
    task = dict(BUILTIN_TASK, data=data, batch_size=121)
    e = only_error(client.post("/v1/jobs", json=job_body(task)))
    assert e["loc"] == ["body", "tasks", 0, "batch_size"]
    assert "larger than the training set of 'iris' (120 of 150 rows" in e["msg"]
    nothing_changed()
    ok = client.post("/v1/jobs", json=job_body(dict(task, batch_size=120)))
    assert ok.status_code == 202, ok.text


# ------------------------------------------------------------------ NaN and Infinity


@pytest.mark.parametrize(
    "old, new, field",
    [
        ('"x_train": [[0.0, 1.0]', '"x_train": [[0.0, NaN]', "tasks[0].data.x_train[0][1]"),
        ('"y_train": [1, 1, 0', '"y_train": [1, NaN, 0', "tasks[0].data.y_train[1]"),
        ('"x_val": [[0.9, 0.1]', '"x_val": [[Infinity, 0.1]', "tasks[0].data.x_val[0][0]"),
        ('"y_val": [1, 0]', '"y_val": [1, -Infinity]', "tasks[0].data.y_val[1]"),
        ('"lr": 0.01', '"lr": NaN', "hyperparameters.lr"),
        ('"momentum": 0.9', '"momentum": Infinity', "hyperparameters.momentum"),
        ('"x_train": [[0.0, 1.0]', '"x_train": [[0.0, 1e999]', "tasks[0].data.x_train[0][1]"),
    ],
)
def test_nan_and_infinity_anywhere(client, nothing_changed, old, new, field):
    text = json.dumps(job_body())
    assert old in text
    text = text.replace(old, new, 1)
    r = post_raw(client, text)
    errors = errors_by_field(r)
    assert field in errors, r.text
    e = errors[field]
    assert e["msg"] == "Input should be a finite number: NaN and Infinity are not allowed"
    assert e["type"] == "finite_number"
    nothing_changed()


def test_nan_in_2d_targets_reports_the_element(client, nothing_changed):
    task = dict(INLINE_TASK, loss="mse")
    task["data"] = dict(INLINE_TASK["data"], y_train=[[1.0, 2.0]] * 6, y_val=[[1.0, 2.0]] * 2)
    text = json.dumps(job_body(task)).replace("[1.0, 2.0]]}", "[1.0, NaN]]}", 1)
    assert "NaN" in text
    e = only_error(post_raw(client, text))
    assert e["field"] == "tasks[0].data.y_val[1][1]"
    assert e["type"] == "finite_number"
    nothing_changed()


# ------------------------------------------------------------------ shapes


def _inline(**data) -> dict:
    task = json.loads(json.dumps(INLINE_TASK))
    task["data"].update(data)
    return task


@pytest.mark.parametrize("split, x_rows, y_rows", [("train", 6, 5), ("val", 2, 3)])
def test_x_y_length_mismatch(client, nothing_changed, split, x_rows, y_rows):
    data = INLINE_TASK["data"]
    y = (data[f"y_{split}"] * 3)[:y_rows]
    e = only_error(client.post("/v1/jobs", json=job_body(_inline(**{f"y_{split}": y}))))
    assert e["loc"] == ["body", "tasks", 0, "data", f"y_{split}"]
    assert e["msg"].startswith(f"y_{split} has {y_rows} rows but x_{split} has {x_rows}")
    assert e["type"] == "length_mismatch"
    nothing_changed()


def test_train_val_width_mismatch(client, nothing_changed):
    task = _inline(x_val=[[0.9, 0.1, 0.0], [0.1, 0.1, 0.0]])
    e = only_error(client.post("/v1/jobs", json=job_body(task)))
    assert e["loc"] == ["body", "tasks", 0, "data", "x_val"]
    assert e["msg"].startswith("x_val rows have 3 features but x_train rows have 2")
    assert e["type"] == "width_mismatch"
    nothing_changed()


def test_ragged_rows(client, nothing_changed):
    x = [list(r) for r in INLINE_TASK["data"]["x_train"]]
    x[3] = [1.0]
    e = only_error(client.post("/v1/jobs", json=job_body(_inline(x_train=x))))
    assert e["loc"] == ["body", "tasks", 0, "data", "x_train", 3]
    assert e["msg"] == "x_train is ragged: row 3 has 1 values but row 0 has 2"
    nothing_changed()


def test_rows_without_features(client, nothing_changed):
    task = _inline(x_train=[[]] * 6, x_val=[[]] * 2)
    r = client.post("/v1/jobs", json=job_body(task))
    errors = errors_by_field(r)
    assert errors["tasks[0].data.x_train[0]"]["msg"] == "x_train rows must have at least one feature"
    nothing_changed()


@pytest.mark.parametrize(
    "y_train, index, shown",
    [([1, 1, 0, 0.5, 2, 1], 3, "0.5"), ([1, 1, 0, 0, -1, 1], 4, "-1"), ([1, 2.25, 0, 0, 1, 1], 1, "2.25")],
)
def test_cross_entropy_labels_must_be_integers_in_range(client, nothing_changed, y_train, index, shown):
    e = only_error(client.post("/v1/jobs", json=job_body(_inline(y_train=y_train))))
    assert e["loc"] == ["body", "tasks", 0, "data", "y_train", index]
    assert e["msg"] == (
        f"y_train[{index}] is {shown}: cross_entropy labels must be integers 0..C-1 (C = number of classes)"
    )
    assert e["type"] == "invalid_label"
    nothing_changed()


def test_cross_entropy_labels_in_validation_data_are_checked_too(client, nothing_changed):
    e = only_error(client.post("/v1/jobs", json=job_body(_inline(y_val=[1, -2]))))
    assert e["field"] == "tasks[0].data.y_val[1]"
    assert "must be integers 0..C-1" in e["msg"]
    nothing_changed()


def test_float_written_integer_labels_are_fine(client):
    r = client.post("/v1/jobs", json=job_body(_inline(y_train=[1.0, 1.0, 0.0, 0.0, 2.0, 1.0])))
    assert r.status_code == 202, r.text


def test_cross_entropy_needs_flat_labels(client, nothing_changed):
    task = _inline(y_train=[[1]] * 6, y_val=[[0]] * 2)
    r = client.post("/v1/jobs", json=job_body(task))
    errors = errors_by_field(r)
    assert set(errors) == {"tasks[0].data.y_train", "tasks[0].data.y_val"}
    assert errors["tasks[0].data.y_train"]["msg"].startswith(
        "cross_entropy needs one integer class label per row, but y_train has rows of targets"
    )
    nothing_changed()


def test_mse_targets_must_match_in_width(client, nothing_changed):
    task = dict(_inline(y_train=[[1.0, 2.0]] * 6, y_val=[[1.0, 2.0, 3.0]] * 2), loss="mse")
    e = only_error(client.post("/v1/jobs", json=job_body(task)))
    assert e["loc"] == ["body", "tasks", 0, "data", "y_val"]
    assert e["msg"].startswith("y_val has rows of 3 targets but y_train has rows of 2 targets")
    nothing_changed()
    task = dict(_inline(y_train=[[1.0]] * 6, y_val=[1.0, 2.0]), loss="mse")
    e = only_error(client.post("/v1/jobs", json=job_body(task)))
    assert e["msg"].startswith("y_val has one target per row but y_train has rows of 1 targets")
    nothing_changed()


def test_mse_with_real_targets_is_fine(client):
    task = dict(_inline(y_train=[0.5, -1.25, 3.0, 0.0, 1.0, 2.0], y_val=[0.1, 0.2]), loss="mse")
    assert client.post("/v1/jobs", json=job_body(task)).status_code == 202
    task = dict(_inline(y_train=[[0.5, 1.0]] * 6, y_val=[[0.1, 0.0]] * 2), loss="mse")
    assert client.post("/v1/jobs", json=job_body(task)).status_code == 202


def test_cross_entropy_on_a_regression_dataset(client, nothing_changed):
    task = dict(BUILTIN_TASK, data={"source": "builtin", "name": "diabetes"})
    e = only_error(client.post("/v1/jobs", json=job_body(task)))
    assert e["loc"] == ["body", "tasks", 0, "loss"]
    assert e["msg"].startswith("builtin dataset 'diabetes' is a regression dataset")
    assert "use loss mse" in e["msg"]
    nothing_changed()


def test_mse_on_a_classification_dataset_is_allowed(client):
    r = client.post("/v1/jobs", json=job_body(dict(BUILTIN_TASK, loss="mse")))
    assert r.status_code == 202, r.text


# ------------------------------------------------------------------ hyperparameters


@pytest.mark.parametrize(
    "hyper, field, msg",
    [
        ({"lr": 20.0}, "hyperparameters.lr", "lr 20 is outside lr_bounds [1e-05, 10]"),
        ({"lr": 0.0}, "hyperparameters.lr", "Input should be greater than 0"),
        (
            {"lr_bounds": [0.1, 0.01], "lr": 0.05},
            "hyperparameters.lr_bounds",
            "lr_bounds must be [low, high] with low < high, got [0.1, 0.01]",
        ),
        ({"lr_bounds": [0.0, 1.0]}, "hyperparameters.lr_bounds", "lr_bounds must be positive, got lower bound 0"),
        (
            {"momentum_bounds": [0.0, 1.0]},
            "hyperparameters.momentum_bounds",
            "momentum_bounds must lie within [0, 1), got [0, 1]",
        ),
        (
            {"momentum": 0.95, "momentum_bounds": [0.0, 0.9]},
            "hyperparameters.momentum",
            "momentum 0.95 is outside momentum_bounds [0, 0.9]",
        ),
        ({"momentum": 1.0}, "hyperparameters.momentum", "Input should be less than 1"),
    ],
)
def test_bad_hyperparameters(client, nothing_changed, hyper, field, msg):
    body = job_body()
    body["hyperparameters"].update(hyper)
    e = only_error(client.post("/v1/jobs", json=body))
    assert e["field"] == field
    assert e["msg"] == msg
    nothing_changed()


# ------------------------------------------------------------------ size and memory


def test_steps_beyond_memory_say_so(client, nothing_changed, settings):
    task = dict(
        BUILTIN_TASK, model={"kind": "mlp", "hidden": [1024, 1024], "activation": "relu"}, steps=5000, batch_size=256
    )
    body = job_body(task)
    body["meta"] = {"method": "reverse"}
    e = only_error(client.post("/v1/jobs", json=body))
    assert e["loc"] == ["body", "tasks", 0, "steps"]
    assert e["type"] == "unroll_too_large"
    assert e["msg"].startswith("steps=5000 with batch_size=256 and hidden=[1024, 1024] needs about ")
    assert ("GiB to differentiate through (method reverse), above the limit of 2 GiB; lower steps or batch_size") in e[
        "msg"
    ]
    nothing_changed()


def test_long_horizons_fit_with_forward_mode_and_auto(client, settings):
    """What reverse mode cannot hold, forward mode (memory independent of steps) can: auto takes it."""
    task = dict(
        BUILTIN_TASK, model={"kind": "mlp", "hidden": [1024, 1024], "activation": "relu"}, steps=5000, batch_size=256
    )
    settings.max_job_flops = 1e20  # this test is about memory; the job is about 10^16 FLOPs
    for method in ("forward", "auto"):
        body = job_body(task)
        body["meta"] = {"method": method}
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 202, (method, r.text)
    # truncated holds only its window: 20 steps fit, 5000 would not.
    body = job_body(task)
    body["meta"] = {"method": "truncated", "truncation": 20}
    assert client.post("/v1/jobs", json=body).status_code == 202
    body["meta"] = {"method": "truncated", "truncation": 5000}
    assert only_error(client.post("/v1/jobs", json=body))["type"] == "unroll_too_large"


def test_a_model_too_big_for_any_method_is_refused_under_auto(client, nothing_changed, settings):
    task = dict(
        BUILTIN_TASK, model={"kind": "mlp", "hidden": [4096] * 16, "activation": "relu"}, steps=1000, batch_size=1024
    )
    e = only_error(client.post("/v1/jobs", json=job_body(task)))
    assert e["type"] == "unroll_too_large" and "(method auto)" in e["msg"]
    nothing_changed()


def test_the_issue_job_is_refused_quickly(client, nothing_changed, settings):
    """32 tasks x hidden [4096] x 10,000 steps x batch 1024 (issue 9: accepted, the worker grew to
    23 GB and was killed): each task alone fits forward mode, the job as the engine batches it does
    not; the 422 says which part sets the peak and what would fit."""
    tasks = [
        dict(
            BUILTIN_TASK,
            data={"source": "builtin", "name": "digits", "seed": i},
            model={"kind": "mlp", "hidden": [4096], "activation": "tanh"},
            steps=10_000,
            batch_size=1024,
        )
        for i in range(32)
    ]
    body = job_body(*tasks, meta={"iterations": 1000, "search": "stencil"})  # the job as reported (stencil then)
    r = client.post("/v1/jobs", json=body)  # priced from the spec's shapes: nothing is built or run
    assert r.status_code == 422, r.text
    e, f = r.json()["detail"]
    assert e["field"] == "tasks" and e["type"] == "job_too_large"
    assert e["msg"].startswith("this job needs about ")
    assert "GiB of memory at its peak, above the limit of 8 GiB" in e["msg"]
    assert "(task, draw) runs batched in one unroll" in e["msg"] and "It would fit with batch_size <= " in e["msg"]
    assert f["field"] == "tasks" and f["type"] == "job_too_expensive"
    assert re.match(r"this job needs about [0-9.]+e\+19 FLOPs of compute, above the limit of 7\.2e\+13 FLOPs", f["msg"])
    assert "iterations <= " not in f["msg"]  # the final evaluation alone is above the limit
    nothing_changed()
    body["tasks"] = body["tasks"][:1]
    body["tasks"][0]["steps"] = 100
    body["tasks"][0]["batch_size"] = 32
    body["meta"]["iterations"] = 20  # 1,000 iterations of hidden [4096] would be above the FLOPs limit
    assert client.post("/v1/jobs", json=body).status_code == 202  # the limit is not a blanket refusal


def test_body_over_the_limit_by_content_length_is_413(tmp_path, db_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=db_url, max_body_bytes=2000))
    with keyed_client(app) as client:
        body = job_body(_inline(x_train=[[0.25, 0.5]] * 400, y_train=[0] * 400))
        data = json.dumps(body).encode()
        assert len(data) > 2000
        r = client.post("/v1/jobs", content=data, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["detail"] == (
            f"the request body of {len(data)} bytes is larger than the limit of 2000 bytes "
            "(0.00190735 MiB); send less data per job"
        )
        small = client.post("/v1/jobs", json=job_body())
        assert small.status_code == 202, small.text  # the limit is not a blanket refusal
        assert count_jobs(app) == 1 and len(enqueued(app)) == 1


def test_chunked_body_over_the_limit_is_413(tmp_path, db_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=db_url, max_body_bytes=2000))
    data = json.dumps(job_body(_inline(x_train=[[0.25, 0.5]] * 400, y_train=[0] * 400))).encode()

    def stream():  # no Content-Length: httpx sends Transfer-Encoding: chunked
        for i in range(0, len(data), 500):
            yield data[i : i + 500]

    with keyed_client(app) as client:
        r = client.post("/v1/jobs", content=stream(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["detail"].startswith("the request body is larger than the limit of 2000 bytes")
        assert count_jobs(app) == 0 and enqueued(app) == []

        small = json.dumps(job_body()).encode()
        r = client.post(
            "/v1/jobs", content=iter([small[:100], small[100:]]), headers={"content-type": "application/json"}
        )
        assert r.status_code == 202, r.text


def test_errors_never_echo_the_input(client, nothing_changed):
    n = 5000
    task = _inline(x_train=[[0.123456789, 0.987654321]] * n, y_train=[0] * (n - 1) + [0.5])
    r = client.post("/v1/jobs", json=job_body(task))
    e = only_error(r)
    assert set(e) == {"loc", "field", "msg", "type"}
    assert len(r.content) < 1000 and "0.123456789" not in r.text
    # pydantic's own errors too (no "input", no "ctx")
    r = post_raw(client, json.dumps(job_body(task)).replace("0.987654321", "NaN"))
    assert r.status_code == 422
    assert all(set(e) == {"loc", "field", "msg", "type"} for e in r.json()["detail"])
    assert "0.123456789" not in r.text
    nothing_changed()


def test_several_problems_are_reported_together(client, nothing_changed):
    body = job_body(dict(INLINE_TASK, batch_size=0, loss="l1"), meta={"iterations": 0})
    fields = set(errors_by_field(client.post("/v1/jobs", json=body)))
    assert fields == {"tasks[0].batch_size", "tasks[0].loss", "meta.iterations"}
    nothing_changed()
