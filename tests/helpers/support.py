"""Helpers shared by the test suite (importable as ``tests.helpers.support``; also served by conftest fixtures)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from service.settings import LOOPBACK_NAMES, Settings

# The PostgreSQL server the suite creates its throwaway databases on (an admin connection to
# an existing database), and the Redis server it borrows one numbered database of.
PG_ADMIN_URLS = (
    [os.environ["GRADTUNE_TEST_PG_ADMIN_URL"]]
    if os.environ.get("GRADTUNE_TEST_PG_ADMIN_URL")
    else [
        "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        "postgresql+psycopg://root@127.0.0.1:5432/test",
    ]
)
REDIS_SERVER_URL = os.environ.get("GRADTUNE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Under pytest-xdist each worker (gw0, gw1, ...) owns the next database up, so parallel workers never
# flush each other's queues.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
REDIS_TEST_DB = int(os.environ.get("GRADTUNE_TEST_REDIS_DB", "13")) + int(_XDIST_WORKER.removeprefix("gw") or 0)
if not 0 <= REDIS_TEST_DB <= 15:  # Redis has databases 0-15; never wrap round onto someone's 0
    raise RuntimeError(
        f"pytest-xdist worker {_XDIST_WORKER} would use Redis database {REDIS_TEST_DB}: lower -n or "
        "GRADTUNE_TEST_REDIS_DB (the workers take it and the numbers above it)"
    )


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test: everything under ``tmp_path/"data"``, GRADTUNE_* environment ignored.

    Unless overridden, the database is SQLite at ``<data_dir>/gradtune.db`` (not migrated: pass
    ``database_url=sqlite_url`` for a migrated one) and the broker is the filesystem transport
    under ``<data_dir>/broker``. ``/readyz`` does not wait for a worker (``ready_needs_worker`` is
    false: most tests run no worker). Any Settings field can be overridden by keyword.
    """
    values: dict[str, Any] = {
        name: field.get_default(call_default_factory=True) for name, field in Settings.model_fields.items()
    }
    values["data_dir"] = Path(tmp_path) / "data"
    values["ready_needs_worker"] = False
    values["allowed_hosts"] = ["testserver", *LOOPBACK_NAMES]  # TestClient sends Host: testserver
    values.update(overrides)
    # Explicit keyword arguments win over the environment in pydantic-settings.
    return Settings(**values)


def queued_messages(settings: Settings) -> list[dict[str, Any]]:
    """Messages waiting in a filesystem broker's queue folder, decoded:
    ``{"task": name, "args": [...], "kwargs": {...}}`` each, oldest first."""
    opts = settings.broker_transport_options()
    folder = Path(opts["data_folder_in"])
    out = []
    for path in sorted(folder.glob("*.msg")) if folder.is_dir() else []:
        out.append(decode_message(json.loads(path.read_text())))
    return out


def decode_message(payload: dict[str, Any]) -> dict[str, Any]:
    """A Celery (protocol 2) message as kombu stores it -> task name, args and kwargs."""
    body = payload["body"]
    if payload.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body).decode()
    args, kwargs, _embed = json.loads(body)
    return {"task": payload["headers"]["task"], "args": args, "kwargs": kwargs}


def stored_files(app) -> list:
    """Every object in an app's local artifact store (refused uploads must leave none)."""
    root = app.state.store.root
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def temp_files(app) -> list:
    """Files left in an app's upload spool folder (there must be none after a request)."""
    tmp = app.state.settings.tmp_dir()
    return sorted(tmp.iterdir()) if tmp.exists() else []


def mock_client(seen: dict[str, Any]):
    """A gradtune.Client on a mock transport that plays a server which accepts everything: dataset
    uploads (bodies kept in ``seen["uploads"]``, ids ds1, ds2, ...), model uploads (requests kept in
    ``seen["models"]``, id m1), one job (body kept in ``seen["job"]``) that has succeeded with
    lr 0.1 and momentum 0.5."""
    import httpx

    from gradtune.client import Client

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            seen.setdefault("models", []).append(request)
            return httpx.Response(201, json={"id": "m1"})
        if path == "/v1/datasets":
            uploads = seen.setdefault("uploads", [])
            uploads.append(request.content)
            return httpx.Response(201, json={"id": f"ds{len(uploads)}"})
        if path == "/v1/jobs" and request.method == "POST":
            seen["job"] = json.loads(request.content)
            return httpx.Response(202, json={"id": "j1", "status": "queued"})
        if path == "/v1/jobs/j1":
            return httpx.Response(200, json={"id": "j1", "status": "succeeded", "progress": {}})
        if path == "/v1/jobs/j1/settings":
            return httpx.Response(200, json={"lr": 0.1, "momentum": 0.5, "evaluation": {}})
        return httpx.Response(404, json={"detail": "no"})

    return Client("http://test", transport=httpx.MockTransport(handler))


def api_key(app_or_factory: Any, tenant: str = "default", admin: bool = False) -> str:
    """A new API key of ``tenant`` in an app's database (``create_app``'s app, or a sessionmaker)."""
    from service import keys

    factory = getattr(getattr(app_or_factory, "state", None), "sessionmaker", app_or_factory)
    with factory() as session:
        _row, key = keys.create_key(session, tenant=tenant, admin=admin)
        session.commit()
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed_client(app: Any, tenant: str = "default", admin: bool = False, **kwargs: Any) -> Any:
    """A TestClient that sends a new key of ``tenant`` with every request (``client.key`` holds it)."""
    from fastapi.testclient import TestClient

    key = api_key(app, tenant=tenant, admin=admin)
    client = TestClient(app, headers={**bearer(key), **kwargs.pop("headers", {})}, **kwargs)
    client.key = key  # type: ignore[attr-defined]
    return client
