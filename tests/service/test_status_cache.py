"""GET /v1/jobs/{id} from the per-process status cache (service/api/status_cache.py): at most
GRADTUNE_STATUS_CACHE_SECONDS old, dropped by this process's cancel, the tenant checked on every hit."""

from __future__ import annotations

import time

from sqlalchemy import update

from service.db.models import Job
from service.main import create_app
from tests.helpers.support import keyed_client
from tests.service.conftest import job_body


def _rename(app, job_id: str, name: str) -> None:
    with app.state.sessionmaker() as s:
        s.execute(update(Job).where(Job.id == job_id).values(name=name))
        s.commit()


def test_a_status_is_at_most_the_cache_time_old(tmp_path, db_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=db_url, status_cache_seconds=0.5))
    with keyed_client(app, "alpha") as a:
        job_id = a.post("/v1/jobs", json=job_body()).json()["id"]
        assert a.get(f"/v1/jobs/{job_id}").json()["name"] == "test-job"
        _rename(app, job_id, "renamed")  # as a worker's commit would change it
        assert a.get(f"/v1/jobs/{job_id}").json()["name"] == "test-job"  # from the cache
        time.sleep(0.6)
        assert a.get(f"/v1/jobs/{job_id}").json()["name"] == "renamed"


def test_a_cancel_shows_at_once_and_the_tenant_is_checked_on_a_hit(tmp_path, db_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=db_url, status_cache_seconds=60))
    with keyed_client(app, "alpha") as a, keyed_client(app, "beta") as b:
        job_id = a.post("/v1/jobs", json=job_body()).json()["id"]
        assert a.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # now cached
        other = b.get(f"/v1/jobs/{job_id}")
        assert other.status_code == 404 and other.json() == {"detail": f"job {job_id} not found"}
        assert a.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        assert a.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_no_cache_at_zero(tmp_path, sqlite_url, make_settings):
    app = create_app(make_settings(tmp_path, database_url=sqlite_url, status_cache_seconds=0))
    with keyed_client(app) as c:
        job_id = c.post("/v1/jobs", json=job_body()).json()["id"]
        c.get(f"/v1/jobs/{job_id}")
        _rename(app, job_id, "renamed")
        assert c.get(f"/v1/jobs/{job_id}").json()["name"] == "renamed"


def test_misses_at_the_same_time_share_one_read():
    import asyncio

    from service.api.status_cache import StatusCache

    cache = StatusCache(seconds=60)
    reads = []

    async def read():
        reads.append(1)
        await asyncio.sleep(0.05)
        return cache.put("j", "alpha", b"{}")

    async def main():
        got = await asyncio.gather(*(cache.fetch("j", read) for _ in range(50)))
        assert {g.body for g in got} == {b"{}"}
        await cache.fetch("j", read)  # a hit now

    asyncio.run(main())
    assert len(reads) == 1
