"""Pure ASGI middleware that refuses request bodies over a size limit with 413.

A declared ``Content-Length`` over the limit is refused before any byte is read. Otherwise
the body is read here, counting bytes as they stream in (chunked uploads have no
Content-Length), and refused as soon as the count passes the limit; a body within the limit
is replayed to the application unchanged.

``passthrough`` names (method, path) pairs whose bodies are not touched here: routes that
stream their body and enforce their own limit (dataset uploads).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _mib(n: int) -> str:
    return f"{n / 1024**2:g} MiB"


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, passthrough: tuple[tuple[str, str], ...] = ()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.passthrough = {(m.upper(), p.rstrip("/") or "/") for m, p in passthrough}

    async def _refuse(self, send: Send, declared: int | None) -> None:
        size = f" of {declared} bytes" if declared is not None else ""
        body = json.dumps(
            {
                "detail": f"the request body{size} is larger than the limit of "
                f"{self.max_body_bytes} bytes ({_mib(self.max_body_bytes)}); "
                "send less data per job"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            (scope.get("method", ""), scope.get("path", "").rstrip("/") or "/") in self.passthrough
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = None
            if declared is not None and declared > self.max_body_bytes:
                await self._refuse(send, declared)
                return
        if length is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return

        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await self._refuse(send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
