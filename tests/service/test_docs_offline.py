"""/docs and /redoc load only what the service itself serves (no CDN, no web fonts): they work on a
machine without internet access; the assets ship with the package, licenses included."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.docs import ASSETS
from service.main import create_app
from tests.helpers.support import make_settings

ROOT = Path(__file__).resolve().parents[2]
TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture
def client(tmp_path, sqlite_url):
    with TestClient(create_app(make_settings(tmp_path, database_url=sqlite_url))) as c:
        yield c


def referenced(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url: ?['\"]([^'\"]+)['\"]", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_page_loads_only_local_assets(client, page):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
    urls = referenced(r.text)
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts and all(u.startswith("/static/docs/") for u in scripts), urls
    for url in urls:
        if url == "/openapi.json":
            assert client.get(url).status_code == 200
            continue
        assert url.startswith("/static/docs/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert TYPES[Path(url).suffix] in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 500, url


def test_swagger_keeps_the_openapi_description_and_the_bearer_scheme(client):
    html = client.get("/docs").text
    assert "/openapi.json" in html and "swagger-ui.css" in html and "SwaggerUIBundle" in html
    spec = client.get("/openapi.json").json()
    assert "/docs" not in spec["paths"] and "/redoc" not in spec["paths"]
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"  # the Authorize button


def test_an_unknown_asset_is_404_and_no_path_escapes(client):
    assert client.get("/static/docs/swagger-ui/nope.js").status_code == 404
    assert client.get("/static/docs/../../main.py").status_code == 404
    assert client.get("/static/docs/%2e%2e/%2e%2e/main.py").status_code == 404


def test_every_vendored_bundle_carries_its_license_and_ships_as_package_data():
    for folder in ("swagger-ui", "redoc"):
        assert (ASSETS / folder / "LICENSE").stat().st_size > 500
    assert (ASSETS / "swagger-ui" / "NOTICE").exists()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    service = ROOT / "service"
    shipped = {p for pattern in patterns for p in service.glob(pattern)}
    # every static file (the docs' assets and the dashboard's) ships, and nothing else
    on_disk = {p for p in (service / "static").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk and on_disk == shipped
