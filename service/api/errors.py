"""Error bodies: every 4xx/5xx answers with a sentence (or a list of field errors), never a traceback.

* Validation errors -> 422 ``{"detail": [{"loc", "field", "msg", "type"}]}``. The offending
  input and pydantic's ``ctx`` are never echoed (a body can be megabytes of numbers).
* Malformed JSON -> 400 ``{"detail": "the request body is not valid JSON: ... at line L column C"}``.
* Database unreachable -> 503; a capacity limit -> 503 with ``Retry-After`` (``retry_later``), the
  database's connection pool exhausted (every connection busy past the pool timeout) included;
  anything unexpected -> 500 with a reference to the logged traceback.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

logger = logging.getLogger("service.api")

_LOC_ROOTS = ("body", "query", "path", "header", "cookie")
# Discriminator values pydantic inserts into the loc of a tagged union (TaskSpec.data, DatasetRef.x).
_UNION_TAGS = {
    "data": {"inline", "builtin", "dataset"},
    "x": {"name", "names"},
    "x_train": {"table", "images"},
    "x_val": {"table", "images"},
    "model": {"mlp", "cnn", "exported"},
}
# ... and into the loc of each item of a list of tagged unions (CNNModel.layers).
_LIST_TAGS = {"layers": {"conv2d", "relu", "tanh", "maxpool", "avgpool", "flatten", "linear"}}
_MESSAGES = {
    "finite_number": "Input should be a finite number: NaN and Infinity are not allowed",
}


class Message(BaseModel):
    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    field: str
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: list[FieldError]


def field_path(loc: list[Any] | tuple[Any, ...]) -> str:
    """``["body", "tasks", 0, "steps"]`` -> ``"tasks[0].steps"``."""
    parts = list(loc)
    if parts and parts[0] in _LOC_ROOTS:
        root, parts = parts[0], parts[1:]
        if not parts:
            return root
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _branch_index(loc: list[Any]) -> int | None:
    """Position of a smart-union member label such as ``'list[float]'`` in a loc."""
    for i, part in enumerate(loc):
        if isinstance(part, str) and "[" in part:
            return i
    return None


def _clean_loc(loc: list[Any]) -> list[Any]:
    out: list[Any] = []
    for part in loc:
        if isinstance(part, str) and "[" in part:
            continue  # union member label
        if out and isinstance(part, str) and part in _UNION_TAGS.get(str(out[-1]), ()):
            continue  # discriminator tag
        if (
            len(out) > 1
            and isinstance(out[-1], int)
            and isinstance(part, str)
            and part in _LIST_TAGS.get(str(out[-2]), ())
        ):
            continue  # discriminator tag of a list item (a cnn layer's type)
        out.append(part)
    return out


def format_errors(errors: list[dict[str, Any]] | tuple[Any, ...]) -> list[dict[str, Any]]:
    """Public field errors: loc without union labels, a ``field`` path, no input or ctx.

    When a value fails every member of a union (``y_train`` is ``list[float] | list[list[float]]``),
    pydantic reports one error per member; only the member that matched deepest is kept.
    """
    errors = [dict(e) for e in errors]
    best: dict[tuple, tuple[str, int]] = {}
    for e in errors:
        loc = list(e.get("loc", ()))
        i = _branch_index(loc)
        if i is None:
            continue
        key, branch, depth = tuple(loc[:i]), loc[i], len(loc)
        if key not in best or depth > best[key][1]:
            best[key] = (branch, depth)
    out, seen = [], set()
    for e in errors:
        loc = list(e.get("loc", ()))
        i = _branch_index(loc)
        if i is not None and best[tuple(loc[:i])][0] != loc[i]:
            continue
        clean = _clean_loc(loc)
        type_ = str(e.get("type", "value_error"))
        if type_ in ("union_tag_invalid", "union_tag_not_found"):
            # TaskSpec.model and CNNModel.layers[] are tagged unions: point at the field that picks
            # the member ("model.kind", "layers[2].type"), as before model became a union
            tag = str((e.get("ctx") or {}).get("discriminator", ""))
            at_model = bool(clean) and clean[-1] == "model"
            at_layer = len(clean) > 1 and isinstance(clean[-1], int) and clean[-2] == "layers"
            if (at_model or at_layer) and len(tag) > 2 and tag[0] == tag[-1] == "'" and tag[1:-1].isidentifier():
                clean.append(tag[1:-1])
        msg = _MESSAGES.get(type_, str(e.get("msg", "")))
        if (tuple(clean), msg) in seen:
            continue
        seen.add((tuple(clean), msg))
        out.append({"loc": clean, "field": field_path(clean), "msg": msg, "type": type_})
    return out


def _json_error_sentence(exc: RequestValidationError, error: dict[str, Any]) -> str:
    reason = (error.get("ctx") or {}).get("error") or "invalid JSON"
    loc = list(error.get("loc") or ())
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    doc = exc.body if isinstance(exc.body, str) else None
    if pos is None:
        return f"the request body is not valid JSON: {reason}"
    if doc is not None:
        line = doc.count("\n", 0, pos) + 1
        column = pos - doc.rfind("\n", 0, pos)
        return f"the request body is not valid JSON: {reason} at line {line} column {column} (char {pos})"
    return f"the request body is not valid JSON: {reason} at char {pos}"


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    for e in errors:
        if e.get("type") == "json_invalid":
            return JSONResponse(status_code=400, content={"detail": _json_error_sentence(exc, e)})
    return JSONResponse(status_code=422, content={"detail": format_errors(errors)})


async def database_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.error("database unavailable during %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        status_code=503,
        content={"detail": "the database is unavailable; try again later"},
    )


# Seconds a client is asked to wait when no database connection came free within the pool timeout.
POOL_RETRY_AFTER = 2


async def pool_exhausted_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("no database connection free during %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        status_code=503,
        content={"detail": "the server is busy: every database connection is in use; try again shortly"},
        headers={"Retry-After": str(POOL_RETRY_AFTER)},
    )


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # the request's id (X-Request-ID, service/api/request_id.py) when it has one: the log line and the
    # client's answer name the same reference
    ref = getattr(request.state, "request_id", None) or uuid.uuid4().hex[:12]
    logger.error("unhandled error %s during %s %s", ref, request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        status_code=500,
        content={"detail": f"internal server error; the details were logged under reference {ref}"},
        headers={"X-Request-ID": ref},  # this answer is made outside the request-id middleware
    )


def retry_later(
    detail: str, seconds: int, headers: dict[str, str] | None = None, status_code: int = 503
) -> HTTPException:
    """503 (or 429, a tenant's quota) with ``Retry-After: seconds``: a capacity limit was reached,
    the request was not started, and the same request may succeed later."""
    return HTTPException(
        status_code=status_code, detail=detail, headers={"Retry-After": str(seconds), **(headers or {})}
    )


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types every handler as taking Exception; this one is registered for (and only ever
    # called with) RequestValidationError.
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, database_error_handler)
    app.add_exception_handler(InterfaceError, database_error_handler)
    app.add_exception_handler(PoolTimeout, pool_exhausted_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
