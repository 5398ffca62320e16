"""The chunk duration histogram: chunks run through the runner in-process write it to this host's
folder under the metrics directory (prometheus_client's multiprocess mode, as a worker process
does), and the API's /metrics sums it with the database's values; a fresh worker process sets
PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import values
from sqlalchemy import select

from service.db.models import JobIteration
from tests.e2e.conftest import small_job
from tests.service.test_metrics import scrape
from worker import chunk_metrics, runner

ROOT = Path(__file__).resolve().parents[2]


def test_chunks_are_timed_by_outcome_and_summed_by_the_api(runner_env, monkeypatch):
    app, client = runner_env.start(chunk_iterations=2)
    jid = client.post("/v1/jobs", json=small_job(iterations=2, tasks=1, steps=10)).json()["id"]
    before = scrape(client)  # no metrics directory yet: the database's values alone
    assert not app.state.settings.resolved_metrics_dir().exists()
    assert before[("gradtune_jobs", (("status", "queued"),))] == 1
    assert not [k for k in before if k[0].startswith("gradtune_chunk_seconds")]

    # this test process imported prometheus_client without the variable: prepare leaves it alone
    assert chunk_metrics.prepare() is None and chunk_metrics.ENV not in os.environ
    with monkeypatch.context() as m:
        # What a worker process is: PROMETHEUS_MULTIPROC_DIR set before prometheus_client's import
        # (this test process imported it long ago), and a histogram of its own.
        m.setenv(chunk_metrics.ENV, "unset")
        m.setattr(values, "ValueClass", values.MultiProcessValue())
        m.setattr(chunk_metrics, "_histogram", None)
        folder = chunk_metrics.prepare()
        assert runner.run_chunk(jid, 0, owner="a") == "committed"
        assert runner.run_chunk(jid, 2, owner="b") == "succeeded"
        assert runner.run_chunk(jid, 2, owner="c") == "skipped"  # no chunk ran: not timed
    assert folder == app.state.settings.resolved_metrics_dir() / chunk_metrics.host_dir(app.state.settings).name
    assert [p.name for p in folder.iterdir()] == [f"histogram_{os.getpid()}.db"]

    got = scrape(client)
    for outcome in ("committed", "succeeded"):
        assert got[("gradtune_chunk_seconds_count", (("outcome", outcome),))] == 1
        assert got[("gradtune_chunk_seconds_sum", (("outcome", outcome),))] > 0
        assert got[("gradtune_chunk_seconds_bucket", (("le", "+Inf"), ("outcome", outcome)))] == 1
    assert not [k for k in got if k[0] == "gradtune_chunk_seconds_count" and dict(k[1])["outcome"] == "skipped"]
    # the engine's own records: two iterations and the evaluations they report
    with app.state.sessionmaker() as s:
        extras = list(s.scalars(select(JobIteration.extra)))
    assert len(extras) == 2 == got[("gradtune_meta_iterations_total", ())]
    assert got[("gradtune_evaluations_total", ())] == sum(e["evaluations"] for e in extras) > 0
    assert got[("gradtune_jobs", (("status", "succeeded"),))] == 1


def test_a_worker_process_is_in_multiprocess_mode_from_its_import(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADTUNE_", "PROMETHEUS_"))}
    env.update(GRADTUNE_DATA_DIR=str(tmp_path), GRADTUNE_METRICS_DIR=str(tmp_path / "m"), PYTHONPATH=str(ROOT))
    code = (
        "import os, worker.celery_app, prometheus_client.values as v; "
        "print(v.ValueClass._multiprocess, os.environ['PROMETHEUS_MULTIPROC_DIR'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    multiprocess, folder = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert multiprocess == "True"
    assert Path(folder).parent == tmp_path / "m" and Path(folder).is_dir()
