"""Bearer keys on every /v1 route (service/keys.py says what a key is).

``authenticate`` is the dependency the /v1 routers carry (service/api/router.py), and the one a
handler names (``PrincipalDep``) to learn the request's tenant: FastAPI runs it once per request.
It is async and answers from a per-process cache when the key was checked within
``GRADTUNE_KEY_CACHE_SECONDS``, so a status poll costs no extra database round trip nor a thread-pool
hop; a miss checks the key in the thread pool. Refusals are 401 with ``WWW-Authenticate: Bearer`` and
a sentence saying which of missing, malformed, unknown or revoked.

The security scheme (``HTTPBearer``) is declared so that the OpenAPI description has it and /docs
shows an Authorize button; the header is read here, to word the refusals.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gradtune.spec import TENANT_RE
from service import keys
from service.api.deps import read_sessionmaker_of
from service.keys import KeyRefused, Principal

logger = logging.getLogger("service.api.auth")

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    bearerFormat="gt_<id>_<secret>",
    description="An API key: `gradtune keys create --tenant NAME` prints one (the first `gradtune serve` "
    "writes an admin key to <data_dir>/admin.key).",
)
# Cached keys per process, at most this many (then the cache starts over).
CACHE_SIZE = 10_000


def _refuse(exc: KeyRefused) -> HTTPException:
    error = "" if exc.reason == "missing" else ' error="invalid_token"'
    return HTTPException(status_code=401, detail=str(exc), headers={"WWW-Authenticate": f"Bearer{error}"})


def _lookup(app: Any, key: str) -> Principal:
    """Check the key with a read session (on SQLite it takes no lock, so a flood of wrong keys cannot
    hold up the workers' commits); refresh its last use, at most once a minute, in a write of its own."""
    with read_sessionmaker_of(app.state)() as session:
        principal, row = keys.check_key(session, key)
        stale = keys.last_use_is_stale(session, row)
    if stale:
        try:
            with app.state.sessionmaker() as session:
                keys.record_use(session, key_id=row.id)
                session.commit()
        except Exception as exc:  # a busy database delays the record, never the request
            logger.warning("could not record the last use of key %s (%s)", row.id, type(exc).__name__)
    return principal


async def check_request(app: Any, authorization: str | None) -> Principal:
    """Who the ``Authorization`` header is (from the cache, else the database), or ``KeyRefused``."""
    key = keys.parse_bearer(authorization)
    state = app.state
    ttl = state.settings.key_cache_seconds
    cache: dict[str, tuple[Principal, float]] = state.key_cache  # set by create_app
    digest = keys.hash_key(key)
    now = time.monotonic()
    hit = cache.get(digest)
    if hit is not None and hit[1] > now:
        return hit[0]
    try:
        principal = await run_in_threadpool(_lookup, app, key)
    except KeyRefused:
        cache.pop(digest, None)
        raise
    if ttl > 0:
        if len(cache) >= CACHE_SIZE:
            cache.clear()
        cache[digest] = (principal, now + ttl)
    return principal


class KeyMiddleware:
    """Checks the key of every /v1 request before anything else runs, the body's parsing included
    (a request without a valid key cannot make the server read a 32 MiB JSON body), answering 401 at
    once; the principal goes to ``request.state.principal`` for ``authenticate``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/v1" or path.startswith("/v1/"):
            headers = dict(scope.get("headers") or [])
            raw = headers.get(b"authorization")
            try:
                principal = await check_request(scope["app"], raw.decode("latin-1") if raw is not None else None)
            except KeyRefused as exc:
                refused = _refuse(exc)
                response = JSONResponse({"detail": refused.detail}, 401, headers=refused.headers)
                await response(scope, receive, send)
                return
            except Exception:  # e.g. the database is down: the route's dependency checks again, where
                pass  # the app's error handlers answer (503 naming the database, no traceback)
            else:
                scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def authenticate(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The request's principal: checked by ``KeyMiddleware`` already (an app without it: here)."""
    principal = getattr(request.state, "principal", None)
    if principal is not None:
        return principal
    try:
        return await check_request(request.app, request.headers.get("authorization"))
    except KeyRefused as exc:
        raise _refuse(exc) from None


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def listing_scope(principal: Principal, tenant: str | None) -> str | None:
    """Whose rows a listing shows: the key's tenant; for an admin key every tenant's, or the one
    ``?tenant=`` names. A non-admin key naming another tenant gets 403."""
    if principal.admin:
        return tenant
    if tenant is not None and tenant != principal.tenant:
        raise HTTPException(
            status_code=403,
            detail=f"only an admin key may list another tenant's rows; this key belongs to tenant {principal.tenant!r}",
        )
    return principal.tenant


TenantQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        pattern=TENANT_RE.pattern,
        description="An admin key lists every tenant's rows, or this tenant's; other keys list their own only.",
    ),
]
