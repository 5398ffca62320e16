"""X-Request-ID: each HTTP request gets an id, a sane one it came with or a fresh one, returned in the
response header and carried by the log lines made while it runs (service/logs.py)."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import REQUEST_ID, install_context

HEADER = b"x-request-id"
# An incoming X-Request-ID is kept when it is 1..128 of these characters (a uuid, a hex or base64 id,
# a trace id); anything else (too long, spaces, quotes, control characters) is replaced.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")


def request_id_from(raw: bytes | None) -> str:
    """The incoming X-Request-ID when it is sane, else a fresh uuid4 hex."""
    if raw:
        text = raw.decode("latin-1").strip()
        if SANE_REQUEST_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI: each HTTP request gets an id (a sane X-Request-ID it came with, else a new one),
    in ``request.state.request_id``, in the context of the log lines made while it runs, and in the
    response's X-Request-ID header. The context is not reset at the end: the request's task ends
    with it, and the layers outside this one (the 500 handler, the server's access line) log under
    the same id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        install_context()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((value for name, value in scope.get("headers", ()) if name.lower() == HEADER), None)
        request_id = request_id_from(raw)
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
