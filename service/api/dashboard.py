"""The web dashboard at ``/``: static files in the package (service/static/dashboard), no build step,
nothing fetched from anywhere but this API. The page asks for an API key once and keeps it in the
tab's session storage; it follows a running job through GET /v1/jobs/{id}/events."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).resolve().parents[1] / "static" / "dashboard"
PREFIX = "/static/dashboard"
# The page runs its own script only, talks to this API only, and is not framed by other sites.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def install_dashboard(app: FastAPI) -> None:
    app.mount(PREFIX, StaticFiles(directory=ASSETS), name="dashboard-static")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(ASSETS / "index.html", headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})
