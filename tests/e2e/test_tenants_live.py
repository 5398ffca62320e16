"""Two tenants side by side on one live `gradtune serve` (API only), through the CLI and the Client:
keys made with `gradtune keys`, each tenant sees only its own jobs and datasets, another tenant's id
answers 404, quotas answer 429, a revoked key answers 401, and an admin lists across tenants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gradtune import Client, GradtuneError
from tests.e2e.conftest import small_job, wait_for
from tests.e2e.test_embedded_serve import _serve, _stop, _up


def _gradtune(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradtune.cli", *args], env=env, capture_output=True, text=True)


def _new_key(env: dict, tenant: str, *extra: str) -> str:
    r = _gradtune(env, "keys", "create", "--tenant", tenant, *extra)
    assert r.returncode == 0, r.stderr
    key = r.stdout.splitlines()[-1]  # the key is the last line of standard output
    assert key.startswith("gt_") and len(key) == 3 + 16 + 1 + 43
    return key


def test_two_tenants_side_by_side_through_the_cli_and_the_client(tmp_path: Path):
    proc, base, env = _serve(tmp_path, "--workers", "0", GRADTUNE_KEY_CACHE_SECONDS="0")
    cli_env = {**env, "GRADTUNE_URL": base}
    try:
        wait_for(lambda: _up(base), 60, "gradtune serve to answer")
        alpha, beta = _new_key(cli_env, "alpha"), _new_key(cli_env, "beta")
        admin = (tmp_path / "data" / "admin.key").read_text().strip()  # tenant default's, from serve

        # alpha through the CLI (--key), beta through the Client (api_key=)
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(small_job(iterations=2, tasks=1)))
        r = _gradtune(cli_env, "submit", str(job_file), "--key", alpha)
        assert r.returncode == 0, r.stderr
        alpha_job = r.stdout.strip()
        csv = tmp_path / "d.csv"
        csv.write_text("a,b,y\n0,1,0\n1,0,1\n1,1,0\n0,0,1\n")
        r = _gradtune({**cli_env, "GRADTUNE_API_KEY": alpha}, "datasets", "upload", str(csv))
        assert r.returncode == 0, r.stderr
        alpha_ds = r.stdout.splitlines()[0].strip()

        with Client(base, api_key=beta) as client:
            beta_job = client.submit(small_job(iterations=2, tasks=1))["id"]
            beta_ds = client.upload_dataset(csv)  # the same bytes: a dataset of beta's own
            assert beta_ds["id"] != alpha_ds and beta_ds["tenant"] == "beta"
            assert [j["id"] for j in client.jobs()["items"]] == [beta_job]
            assert [d["id"] for d in client.datasets()["items"]] == [beta_ds["id"]]
            with pytest.raises(GradtuneError) as err:
                client.job(alpha_job)
            assert err.value.status_code == 404 and f"job {alpha_job} not found" in str(err.value)

        r = _gradtune(cli_env, "jobs", "--key", alpha)
        assert r.returncode == 0 and [line.split()[0] for line in r.stdout.splitlines()] == [alpha_job]
        r = _gradtune(cli_env, "status", beta_job, "--key", alpha)
        assert r.returncode == 1 and "404" in r.stderr
        r = _gradtune(cli_env, "jobs", "--key", "gt_0000000000000000_" + "x" * 43)
        assert r.returncode == 1 and "401" in r.stderr and "not known" in r.stderr

        # the admin key (GRADTUNE_API_KEY unset, URL on this machine: the CLI reads data/admin.key)
        r = _gradtune(cli_env, "jobs")
        assert r.returncode == 0 and {line.split()[0] for line in r.stdout.splitlines()} == {alpha_job, beta_job}
        one = httpx.get(f"{base}/v1/jobs", params={"tenant": "beta"}, headers={"Authorization": f"Bearer {admin}"})
        assert [j["id"] for j in one.json()["items"]] == [beta_job]

        # a quota of 1 active job for alpha, which has one queued: 429 with Retry-After
        r = _gradtune(cli_env, "keys", "quota", "--tenant", "alpha", "--active-jobs", "1")
        assert r.returncode == 0 and "alpha  max_active_jobs  1" in r.stdout
        refused = httpx.post(f"{base}/v1/jobs", json=small_job(), headers={"Authorization": f"Bearer {alpha}"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
        assert "has 1 active jobs" in refused.json()["detail"] and "limit is 1" in refused.json()["detail"]

        # keys list shows both, with last use; revoke alpha's: 401 at once (cache off)
        r = _gradtune(cli_env, "keys", "list", "--tenant", "alpha")
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 2
        key_id = alpha.split("_")[1]
        assert r.stdout.splitlines()[1].startswith(key_id)
        r = _gradtune(cli_env, "keys", "revoke", key_id)
        assert r.returncode == 0 and f"revoked key {key_id} of tenant alpha" in r.stdout
        r = _gradtune(cli_env, "jobs", "--key", alpha)
        assert r.returncode == 1 and "401" in r.stderr and "revoked" in r.stderr
    finally:
        _stop(proc)
