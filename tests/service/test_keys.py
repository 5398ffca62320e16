"""API keys (service/keys.py, service/api/auth.py): random, stored hashed, checked in constant time,
revoked, last use recorded at most once a minute; and the per-process cache of checked keys."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service import keys
from service.db.models import ApiKey
from service.main import create_app
from tests.helpers.support import api_key, bearer


@pytest.fixture
def app(tmp_path, db_url, make_settings):
    return create_app(make_settings(tmp_path, database_url=db_url, key_cache_seconds=0))


def test_keys_are_random_and_only_their_hash_is_stored(app):
    made = [api_key(app, "alpha") for _ in range(20)]
    assert len(set(made)) == 20
    for key in made:
        assert keys.KEY_RE.match(key), key
        secret = key.split("_", 2)[2]
        assert len(secret) == 43  # 32 random bytes, URL-safe base64
    with app.state.sessionmaker() as s:
        rows = {r.id: r for r in s.scalars(select(ApiKey))}
    for key in made:
        row = rows[key.split("_")[1]]
        assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() and key not in row.key_hash
        assert (row.tenant, row.admin, row.revoked_at, row.last_used_at) == ("alpha", False, None, None)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Basic dXNlcjpwdw==", "malformed"),
        ("Bearer", "malformed"),
        ("Bearer gt_123_abc", "malformed"),
        ("Bearer " + "gt_" + "g" * 16 + "_" + "a" * 43, "malformed"),  # not hex
    ],
)
def test_parse_bearer_says_what_is_wrong(header, reason):
    with pytest.raises(keys.KeyRefused) as err:
        keys.parse_bearer(header)
    assert err.value.reason == reason


def test_a_key_with_a_known_id_but_another_secret_is_unknown(app):
    key = api_key(app, "alpha")
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    with app.state.sessionmaker() as s:
        with pytest.raises(keys.KeyRefused) as err:
            keys.check_key(s, forged)
        assert err.value.reason == "unknown"
        principal, _ = keys.check_key(s, key)
    assert principal.tenant == "alpha" and principal.scope() == "alpha"


def test_last_use_is_recorded_at_most_once_a_minute(app):
    key = api_key(app, "alpha")
    key_id = key.split("_")[1]
    with TestClient(app, headers=bearer(key)) as c:
        assert c.get("/v1/jobs").status_code == 200
        with app.state.sessionmaker() as s:
            first = s.get(ApiKey, key_id).last_used_at
        assert first is not None
        assert c.get("/v1/jobs").status_code == 200
        with app.state.sessionmaker() as s:
            assert s.get(ApiKey, key_id).last_used_at == first  # within the minute: no write
            row = s.get(ApiKey, key_id)
            row.last_used_at = first - timedelta(minutes=2)
            s.commit()
        assert c.get("/v1/jobs").status_code == 200
        with app.state.sessionmaker() as s:
            assert s.get(ApiKey, key_id).last_used_at > first - timedelta(minutes=2)


def test_a_revoked_key_stops_working_once_the_cache_expires(tmp_path, db_url, make_settings):
    cached = create_app(make_settings(tmp_path, database_url=db_url, key_cache_seconds=3600))
    key = api_key(cached, "alpha")
    with TestClient(cached, headers=bearer(key)) as c:
        assert c.get("/v1/jobs").status_code == 200
        with cached.state.sessionmaker() as s:
            keys.revoke_key(s, key_id=key.split("_")[1])
            s.commit()
        assert c.get("/v1/jobs").status_code == 200  # checked within the cache time
        cached.state.key_cache.clear()  # as when GRADTUNE_KEY_CACHE_SECONDS have passed
        r = c.get("/v1/jobs")
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_the_cache_never_answers_for_a_key_it_did_not_check(app):
    """A cache hit needs the whole key: the same id with another secret is looked up (and refused)."""
    app.state.settings.key_cache_seconds = 3600
    key = api_key(app, "alpha")
    with TestClient(app) as c:
        assert c.get("/v1/jobs", headers=bearer(key)).status_code == 200
        forged = key[:-2] + ("xx" if key[-2:] != "xx" else "yy")
        r = c.get("/v1/jobs", headers=bearer(forged))
    assert r.status_code == 401 and "not known" in r.json()["detail"]


def test_quotas_default_to_the_settings_and_can_be_overridden(app):
    settings = app.state.settings
    with app.state.sessionmaker() as s:
        assert keys.quotas_of(s, tenant="nobody", settings=settings) == {
            "max_active_jobs": settings.tenant_max_active_jobs,
            "max_stored_bytes": settings.tenant_max_stored_bytes,
            "max_concurrent_uploads": settings.tenant_max_concurrent_uploads,
        }
        keys.set_quotas(s, tenant="alpha", max_active_jobs=3)
        s.commit()
        assert keys.quotas_of(s, tenant="alpha", settings=settings)["max_active_jobs"] == 3
        keys.set_quotas(s, tenant="alpha", max_active_jobs=None)
        assert (
            keys.quotas_of(s, tenant="alpha", settings=settings)["max_active_jobs"] == settings.tenant_max_active_jobs
        )
        with pytest.raises(ValueError, match="unknown quota"):
            keys.set_quotas(s, tenant="alpha", max_gpus=1)
        with pytest.raises(ValueError, match="0 or more"):
            keys.set_quotas(s, tenant="alpha", max_active_jobs=-1)


@pytest.mark.parametrize("name", ["", "Alpha", "-x", "a" * 65, "a b", "a/b", "ä"])
def test_tenant_names_are_checked(name):
    with pytest.raises(keys.BadTenant, match=re.escape(keys.TENANT_RULE)):
        keys.check_tenant_name(name)
