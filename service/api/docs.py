"""/docs (Swagger UI) and /redoc from assets the service ships (service/static/docs/, with their
licenses): the pages work on a machine without internet access, where FastAPI's defaults load
their scripts from a CDN and show a blank page. The app is built with ``docs_url=None,
redoc_url=None``; ``install_docs`` adds these routes and mounts the assets at /static/docs."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).resolve().parents[1] / "static" / "docs"
PREFIX = "/static/docs"
SWAGGER_JS = f"{PREFIX}/swagger-ui/swagger-ui-bundle.js"
SWAGGER_CSS = f"{PREFIX}/swagger-ui/swagger-ui.css"
REDOC_JS = f"{PREFIX}/redoc/redoc.standalone.js"
FAVICON = f"{PREFIX}/swagger-ui/favicon-32x32.png"


def install_docs(app: FastAPI) -> None:
    """GET /docs and /redoc (left out of the OpenAPI description), and the assets they load."""
    app.mount(PREFIX, StaticFiles(directory=ASSETS), name="docs-static")
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{title} - Swagger UI",
            swagger_js_url=SWAGGER_JS,
            swagger_css_url=SWAGGER_CSS,
            swagger_favicon_url=FAVICON,
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{title} - ReDoc",
            redoc_js_url=REDOC_JS,
            redoc_favicon_url=FAVICON,
            with_google_fonts=False,
        )
