"""An API app per test, on a migrated database (SQLite and PostgreSQL via db_url) and the
filesystem broker in tmp_path, plus helpers to see what a request stored and enqueued."""

from __future__ import annotations

import copy

import pytest
from sqlalchemy import func, select

from service.db.models import Job
from service.main import create_app
from tests.helpers.support import queued_messages

INLINE_TASK = {
    "name": "t0",
    "data": {
        "source": "inline",
        "x_train": [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.5, 0.5], [0.2, 0.8]],
        "y_train": [1, 1, 0, 0, 2, 1],
        "x_val": [[0.9, 0.1], [0.1, 0.1]],
        "y_val": [1, 0],
    },
    "model": {"kind": "mlp", "hidden": [4], "activation": "tanh"},
    "loss": "cross_entropy",
    "steps": 10,
    "batch_size": 2,
}

BUILTIN_TASK = {
    "name": "digits",
    "data": {"source": "builtin", "name": "digits", "val_fraction": 0.2, "seed": 0},
    "model": {"kind": "mlp", "hidden": [32], "activation": "tanh"},
    "loss": "cross_entropy",
    "steps": 100,
    "batch_size": 32,
}


def job_body(*tasks: dict, **top) -> dict:
    """A valid job body (one inline task unless tasks are given), deep-copied so tests may mutate it."""
    body = {
        "name": "test-job",
        "tasks": [copy.deepcopy(t) for t in (tasks or (INLINE_TASK,))],
        "hyperparameters": {"lr": 0.01, "momentum": 0.9},
        "meta": {"iterations": 5, "seed": 0},
    }
    body.update(copy.deepcopy(top))
    return body


@pytest.fixture
def settings(tmp_path, db_url, make_settings):
    return make_settings(tmp_path, database_url=db_url)


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    from tests.helpers.support import keyed_client

    with keyed_client(app) as c:
        yield c


def count_jobs(app) -> int:
    with app.state.sessionmaker() as s:
        return s.scalar(select(func.count()).select_from(Job))


def enqueued(app) -> list[dict]:
    return queued_messages(app.state.settings)


@pytest.fixture
def nothing_changed(app):
    """Call after a refused request: asserts no job row and no queue message appeared."""

    def check() -> None:
        assert count_jobs(app) == 0, "a refused request stored a job"
        assert enqueued(app) == [], "a refused request enqueued a message"

    return check
