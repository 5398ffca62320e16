"""The client's and the CLI's studies against an in-process app: create, read, list, settings and
history; a job naming a study (its body carries the study, not hyperparameters); a refused job
names the field; the jobs of a study (Client.jobs(study=...), gradtune jobs --study)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import gradtune.client
from gradtune import cli
from gradtune.client import Client, GradtuneError
from tests.service.conftest import INLINE_TASK, job_body

REAL_CLIENT = gradtune.client.Client


@pytest.fixture
def client(db_url, tmp_path, make_settings):
    from service.main import create_app
    from tests.helpers.support import keyed_client

    with keyed_client(create_app(make_settings(tmp_path, database_url=db_url))) as c:
        yield c


@pytest.fixture
def api(client):
    return Client("http://testserver", transport=client._transport, api_key=client.key)


def test_client_creates_reads_and_lists_studies(api):
    s = api.create_study("c", lr=0.05, momentum=0.5, holdout_every=3, lr_bounds=(1e-4, 1.0))
    assert s["hyperparameters"]["lr_bounds"] == [1e-4, 1.0] and s["holdout_every"] == 3
    assert api.study(s["id"])["id"] == s["id"]
    assert [i["id"] for i in api.studies()["items"]] == [s["id"]]
    settings = api.study_settings(s["id"])
    assert (settings.lr, settings.momentum, settings.raw["version"]) == (0.05, 0.5, 0)
    assert api.study_history(s["id"]) == []
    body = job_body(INLINE_TASK)
    del body["hyperparameters"]
    job = api.submit({**body, "study": s["id"]})
    assert job["progress"]["lr"] == 0.05 and api.study(s["id"])["pool"]["tasks"] == 1
    with pytest.raises(GradtuneError) as err:
        api.submit({**body, "study": "nope"})
    assert err.value.status_code == 422 and "study nope not found" in str(err.value)


def test_cli_studies_commands(api, client, monkeypatch):
    monkeypatch.setattr(
        gradtune.client, "Client", lambda url, **kw: REAL_CLIENT(url, transport=client._transport, api_key=client.key)
    )
    runner = CliRunner()
    r = runner.invoke(cli.cli, ["studies", "create", "--name", "from-cli", "--lr", "0.03", "--holdout-every", "5"])
    assert r.exit_code == 0, r.output
    sid = r.output.strip()
    assert api.study(sid)["holdout_every"] == 5
    r = runner.invoke(cli.cli, ["studies", "list"])
    assert r.exit_code == 0 and sid in r.output and "from-cli" in r.output and "lr=0.03" in r.output
    r = runner.invoke(cli.cli, ["studies", "show", sid])
    assert r.exit_code == 0 and "version 0" in r.output
    r = runner.invoke(cli.cli, ["studies", "settings", sid])
    assert r.exit_code == 0 and json.loads(r.output)["lr"] == 0.03
    r = runner.invoke(cli.cli, ["studies", "show", "missing"])
    assert r.exit_code == 1 and "study missing not found" in r.output


def test_the_jobs_of_a_study_from_the_client_and_the_cli(api, client, monkeypatch):
    s = api.create_study("listed")
    body = job_body(INLINE_TASK)
    plain = api.submit(body)["id"]
    del body["hyperparameters"]
    joined = api.submit({**body, "study": s["id"]})["id"]
    page = api.jobs(study=s["id"])
    assert [j["id"] for j in page["items"]] == [joined] and page["items"][0]["study"] == s["id"]
    assert {j["id"] for j in api.jobs()["items"]} == {plain, joined}
    assert api.jobs(study=s["id"], status="running")["total"] == 0
    monkeypatch.setattr(
        gradtune.client, "Client", lambda url, **kw: REAL_CLIENT(url, transport=client._transport, api_key=client.key)
    )
    r = CliRunner().invoke(cli.cli, ["jobs", "--study", s["id"]])
    assert r.exit_code == 0, r.output
    assert joined in r.output and plain not in r.output
