"""`gradtune keys` against SQLite and PostgreSQL directly (as `gradtune migrate` does), and serve's
first admin key."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gradtune.cli import cli
from service import keys
from service.db.session import scoped_session
from service.settings import get_settings


@pytest.fixture
def run(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTUNE_DATABASE_URL", db_url)
    monkeypatch.setenv("GRADTUNE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    runner = CliRunner()
    yield lambda *args: runner.invoke(cli, list(args))
    get_settings.cache_clear()


def test_create_list_revoke(run, db_url):
    made = run("keys", "create", "--tenant", "alpha")
    assert made.exit_code == 0, made.output
    key = made.output.splitlines()[-1]
    assert keys.KEY_RE.match(key)
    admin = run("keys", "create", "--tenant", "ops", "--admin").output.splitlines()[-1]
    with scoped_session(db_url) as s:
        principal, _ = keys.check_key(s, key)
        assert (principal.tenant, principal.admin) == ("alpha", False)
        assert keys.check_key(s, admin)[0].admin is True

    listing = run("keys", "list")
    assert listing.exit_code == 0 and key not in listing.output  # ids only, never the keys
    rows = listing.output.splitlines()
    assert rows[0].split()[:3] == ["id", "tenant", "admin"] and len(rows) == 3
    assert rows[1].split()[:3] == [key.split("_")[1], "alpha", "-"] and rows[1].endswith("-")  # never used
    assert len(run("keys", "list", "--tenant", "ops").output.splitlines()) == 2

    revoked = run("keys", "revoke", key.split("_")[1])
    assert revoked.exit_code == 0 and "revoked key" in revoked.output
    with scoped_session(db_url) as s, pytest.raises(keys.KeyRefused, match="revoked"):
        keys.check_key(s, key)
    unknown = run("keys", "revoke", "0" * 16)
    assert unknown.exit_code == 1 and "no API key with id" in unknown.output


def test_quota_sets_shows_and_resets(run):
    out = run("keys", "quota", "--tenant", "alpha", "--active-jobs", "3", "--uploads", "1")
    assert out.exit_code == 0, out.output
    assert "alpha  max_active_jobs  3" in out.output and "alpha  max_concurrent_uploads  1" in out.output
    shown = run("keys", "quota", "--tenant", "alpha").output
    assert "alpha  max_active_jobs  3" in shown
    reset = run("keys", "quota", "--tenant", "alpha", "--reset").output
    assert f"alpha  max_active_jobs  {get_settings().tenant_max_active_jobs}" in reset
    assert run("keys", "quota", "--tenant", "alpha", "--active-jobs", "-1").exit_code == 2


@pytest.mark.parametrize("name", ["Alpha", "a b", "-x"])
def test_a_bad_tenant_name_is_refused_before_the_database(run, name):
    out = run("keys", "create", "--tenant", name)
    assert out.exit_code == 2 and "is not a tenant name" in out.output


def test_an_unmigrated_database_is_a_sentence_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTUNE_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(cli, ["keys", "list"])
    finally:
        get_settings.cache_clear()
    assert out.exit_code == 1 and "migrated (gradtune migrate)" in out.output and "Traceback" not in out.output


def test_the_first_admin_key_is_made_once_with_mode_0600(db_url, tmp_path):
    with scoped_session(db_url) as s:
        path, key = keys.first_admin_key(s, tmp_path / "data")
    assert path.read_text().strip() == key and path.stat().st_mode & 0o777 == 0o600
    with scoped_session(db_url) as s:
        assert keys.check_key(s, key)[0] == keys.Principal(key_id=key.split("_")[1], tenant="default", admin=True)
        assert keys.first_admin_key(s, tmp_path / "data") is None  # keys exist: nothing new
    assert path.read_text().strip() == key
