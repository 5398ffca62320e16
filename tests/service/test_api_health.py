"""Probes, OpenAPI, the catch-all error handler and the API's import boundary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import repository
from service.keys import new_key
from service.main import create_app
from tests.helpers.support import bearer, keyed_client

ROOT = Path(__file__).resolve().parents[2]


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_ok(client):
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "detail": None, "checks": {"database": "ok", "broker": "ok"}}


def test_readyz_ok_with_redis(tmp_path, db_url, redis_url, make_settings):
    with TestClient(create_app(make_settings(tmp_path, database_url=db_url, broker_url=redis_url))) as c:
        r = c.get("/readyz")
    assert r.status_code == 200, r.text


def test_readyz_503_when_the_broker_is_unreachable(tmp_path, sqlite_url, make_settings):
    settings = make_settings(tmp_path, database_url=sqlite_url, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
        assert c.get("/healthz").status_code == 200  # alive all the same
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"] == "unreachable"  # what is down, not the error's text
    assert body["detail"] == "not ready: broker unreachable"


@pytest.mark.parametrize(
    "url",
    ["sqlite:////nonexistent-gradtune-dir/sub/x.db", "postgresql+psycopg://postgres@127.0.0.1:1/nothing"],
    ids=["sqlite", "postgresql"],
)
def test_readyz_503_when_the_database_is_unreachable(tmp_path, make_settings, url):
    with TestClient(create_app(make_settings(tmp_path, database_url=url))) as c:
        r = c.get("/readyz")
        jobs = c.get("/v1/jobs", headers=bearer(new_key()[1]))  # checking the key needs the database
    assert r.status_code == 503
    body = r.json()
    assert body["checks"]["broker"] == "ok"
    assert body["checks"]["database"] == "unreachable"
    assert body["detail"] == "not ready: database unreachable"
    # and a request that needs the database says so, without a traceback
    assert jobs.status_code == 503
    assert jobs.json() == {"detail": "the database is unavailable; try again later"}


def test_readyz_503_when_the_database_is_not_migrated(tmp_path, make_settings):
    settings = make_settings(tmp_path)  # SQLite in tmp_path, never migrated
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["database"] == ("reachable but not migrated (run the migrations: alembic upgrade head)")


def test_unexpected_errors_are_a_sentence_not_a_traceback(app, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(repository, "list_jobs", broken)
    with keyed_client(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/jobs")
    assert r.status_code == 500
    detail = r.json()["detail"]
    assert detail.startswith("internal server error; the details were logged under reference ")
    assert "secret" not in r.text and "Traceback" not in r.text
    ref = detail.rsplit(" ", 1)[1]
    assert any(ref in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_unknown_route_is_404(client):
    r = client.get("/v2/jobs")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_openapi_documents_the_endpoints(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    paths = {p: set(ops) for p, ops in spec["paths"].items()}
    assert paths == {
        "/v1/jobs": {"get", "post"},
        "/v1/jobs/{job_id}": {"get"},
        "/v1/jobs/{job_id}/history": {"get"},
        "/v1/jobs/{job_id}/events": {"get"},
        "/v1/jobs/{job_id}/settings": {"get"},
        "/v1/jobs/{job_id}/cancel": {"post"},
        "/v1/datasets": {"get", "post"},
        "/v1/datasets/{dataset_id}": {"get", "delete"},
        "/v1/models": {"get", "post"},
        "/v1/models/{model_id}": {"get", "delete"},
        "/v1/workers": {"get"},
        "/v1/studies": {"get", "post"},
        "/v1/studies/{study_id}": {"get"},
        "/v1/studies/{study_id}/settings": {"get"},
        "/v1/studies/{study_id}/history": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/metrics": {"get"},
    }
    post = spec["paths"]["/v1/jobs"]["post"]
    assert post["tags"] == ["jobs"]
    assert set(post["responses"]) >= {"202", "400", "413", "415", "422"}
    assert "Location" in post["responses"]["202"]["headers"]
    examples = post["requestBody"]["content"]["application/json"]["examples"]
    assert {"digits", "inline"} <= set(examples)
    # the 422 schema is ours (field, no input/ctx)
    schema = spec["components"]["schemas"]["FieldError"]
    assert set(schema["properties"]) == {"loc", "field", "msg", "type"}
    assert set(spec["paths"]["/v1/jobs/{job_id}/settings"]["get"]["responses"]) >= {"200", "404", "409"}
    assert client.get("/docs").status_code == 200


def test_the_documented_examples_are_accepted(client):
    spec = client.get("/openapi.json").json()
    examples = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    for name, example in examples.items():
        r = client.post("/v1/jobs", json=example["value"])
        assert r.status_code == 202, (name, r.text)


def test_importing_the_api_leaves_torch_numpy_pyarrow_boto3_and_the_worker_out(tmp_path):
    code = (
        "import sys, json\n"
        "import service.main\n"
        "from service.settings import Settings\n"
        "app = service.main.create_app(Settings(data_dir='data'))\n"
        "heavy = ('torch', 'numpy', 'worker', 'sklearn', 'pyarrow', 'boto3', 'botocore', 'safetensors')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_importing_service_main_opens_and_creates_nothing(tmp_path):
    code = "import service.main, os; print(sorted(os.listdir('.')))"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
