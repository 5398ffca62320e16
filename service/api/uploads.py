"""Streamed file uploads, shared by POST /v1/datasets and POST /v1/models.

An upload streams: the multipart body is parsed as it arrives, the file part written to a
temporary file under ``<data_dir>/tmp`` in chunks while it is hashed and counted, and refused
with 413 as soon as it passes ``GRADTUNE_MAX_UPLOAD_BYTES`` (the body-size middleware lets these
routes through unbuffered). ``upload`` then checks the file (an ``UploadKind``'s ``check``),
stores it in the artifact store under its sha256 and records it in the database. Whatever goes
wrong, the temporary file is removed, and a refused file leaves no row and no stored object.

The same bytes uploaded twice are one row: the second upload answers 200 with the row the first
one created (201).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
from fastapi import HTTPException, Request, Response, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service import keys, repository, upload_quota
from service.api.errors import Message, ValidationErrorBody, retry_later
from service.keys import Principal
from service.settings import Settings
from service.storage import ArtifactStore, StoreError

FIELD = "file"
UPLOAD_RETRY_AFTER = 5  # seconds a client is asked to wait when every upload slot is taken
# Multipart framing around the file (boundaries, part headers, small extra fields).
FRAMING_BYTES = 64 * 1024


class _TooLarge(Exception):
    pass


class Refused(Exception):
    """A problem with the upload itself: HTTP status, and the sentence or field error to answer."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status_code = status_code
        self.detail = detail


def file_error(msg: str, type_: str) -> Refused:
    return Refused(422, [{"loc": ["body", FIELD], "field": FIELD, "msg": msg, "type": type_}])


def _clean_filename(raw: bytes, extensions: str) -> str:
    name = raw.decode("utf-8", errors="replace")
    name = re.split(r"[\\/]", name)[-1]  # browsers and curl may send a path
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if not name or name in (".", ".."):
        raise file_error(
            f"the file part has an empty filename; name the file with its extension ({extensions})",
            "missing_filename",
        )
    if len(name) > 255:
        raise file_error(f"the filename is {len(name)} characters long; at most 255 are allowed", "filename_too_long")
    return name


class Receiver:
    """python-multipart callbacks: the part named ``file`` goes to a temporary file, hashed and
    counted as it streams; other parts are skipped (and limited in size).

    ``check_name(filename) -> format`` refuses a wrong extension (an exception with ``code``)
    before any of the file is written; ``example`` is the file named in hints (curl -F ...)."""

    def __init__(
        self, tmp_dir: Path, limit: int, *, check_name: Callable[[str], str], example: str, extensions: str
    ) -> None:
        self.tmp_dir = tmp_dir
        self.limit = limit
        self.check_name = check_name
        self.example = example
        self.extensions = extensions
        self.filename: str | None = None
        self.format: str | None = None
        self.path: Path | None = None
        self.size = 0
        self.sha = hashlib.sha256()
        self.file_done = False
        self.ended = False
        self._fh: IO[bytes] | None = None
        self._in_file = False
        self._headers: dict[str, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()

    # -- callbacks
    def on_part_begin(self) -> None:
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._field).decode("latin-1").strip().lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _kind, params = parse_options_header(self._headers.get("content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", errors="replace")
        if name != FIELD:
            self._in_file = False
            return
        if self.path is not None:
            raise file_error(
                "the upload holds more than one part named 'file'; send one file per request", "too_many_files"
            )
        if b"filename" not in params:
            raise file_error(
                "the 'file' part is not a file (it has no filename); send it as a file, e.g. "
                f"curl -F file=@{self.example}",
                "missing_filename",
            )
        self.filename = _clean_filename(params[b"filename"], self.extensions)
        try:
            self.format = self.check_name(self.filename)  # refuse a wrong extension before reading on
        except ValueError as exc:
            raise file_error(str(exc), getattr(exc, "code", "unsupported_format")) from None
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-", suffix=".part")
        self.path = Path(path)
        self._fh = os.fdopen(fd, "wb")
        self._in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_file:
            return
        chunk = data[start:end]
        self.size += len(chunk)
        if self.size > self.limit:
            raise _TooLarge()
        self.sha.update(chunk)
        assert self._fh is not None  # set with _in_file
        self._fh.write(chunk)

    def on_part_end(self) -> None:
        if self._in_file:
            assert self._fh is not None  # set with _in_file
            self._fh.close()
            self._in_file = False
            self.file_done = True

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> Any:  # python_multipart's MultipartCallbacks (a TypedDict of its stubs only)
        return {
            name: getattr(self, name)
            for name in (
                "on_part_begin",
                "on_header_field",
                "on_header_value",
                "on_header_end",
                "on_headers_finished",
                "on_part_data",
                "on_part_end",
                "on_end",
            )
        }

    def cleanup(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _human(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _too_large(limit: int, filename: str | None) -> Refused:
    what = f"file {filename!r}" if filename else "the upload"
    return Refused(
        413,
        f"{what} is larger than the upload limit of {limit} bytes ({_human(limit)}, GRADTUNE_MAX_UPLOAD_BYTES)",
    )


async def receive(
    request: Request,
    limit: int,
    tmp_dir: Path,
    *,
    check_name: Callable[[str], str],
    example: str,
    extensions: str,
) -> Receiver:
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    content_type = request.headers.get("content-type", "")
    media, params = parse_options_header(content_type)
    if media != b"multipart/form-data":
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise Refused(
            415,
            f"upload the file as multipart/form-data in a field named 'file', got {got} "
            f"(with curl: -F file=@{example})",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise Refused(400, "the multipart/form-data Content-Type has no boundary")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + FRAMING_BYTES:
        raise _too_large(limit, None)

    receiver = Receiver(tmp_dir, limit, check_name=check_name, example=example, extensions=extensions)
    parser = MultipartParser(boundary, receiver.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            parser.write(chunk)  # the file part alone stops at the limit (naming the file)
            received += len(chunk)
            if received > limit + FRAMING_BYTES:
                raise _TooLarge()
        parser.finalize()
    except _TooLarge:
        receiver.cleanup()
        raise _too_large(limit, receiver.filename) from None
    except MultipartParseError as exc:
        receiver.cleanup()
        raise Refused(400, f"the multipart body is malformed: {exc}") from None
    except ClientDisconnect:
        receiver.cleanup()
        raise Refused(400, "the client disconnected before the upload was complete") from None
    except BaseException:
        receiver.cleanup()
        raise
    if receiver.path is None:
        receiver.cleanup()
        raise Refused(
            422,
            [
                {
                    "loc": ["body", FIELD],
                    "field": FIELD,
                    "msg": "Field required: send the file in a "
                    f"multipart field named 'file' (curl -F file=@{receiver.example})",
                    "type": "missing",
                }
            ],
        )
    if not (receiver.file_done and receiver.ended):
        receiver.cleanup()
        raise Refused(400, "the multipart body ended before its closing boundary: the upload is incomplete")
    return receiver


@dataclass(frozen=True)
class UploadKind:
    """What one upload route does its own way; ``upload`` does the rest."""

    noun: str  # "dataset", "model": in messages
    location: str  # the collection's URL: a stored file answers with Location <location>/<id>
    logger: logging.Logger
    check_name: Callable[[str], str]  # file name -> format; a ValueError (with ``code``) refuses it
    example: str  # the file named in hints (curl -F file=@<example>)
    extensions: str  # the accepted extensions, in words
    check: Callable[[Receiver, Settings], Any]  # the received file's facts, or a Refused (422)
    get_by_sha256: Callable[..., Any]  # (session, *, sha256, tenant) -> the tenant's row of those bytes, or None
    create: Callable[[Session, Receiver, str, Any, str], Any]  # (session, upload, sha256, facts, tenant) -> new row
    to_public: Callable[[Any], Any]  # row -> the response model
    # (session, id, tenant or None for any) -> the deleted row; ``not_found`` or Conflict
    delete: Callable[[Session, str, str | None], Any]
    not_found: type[Exception]
    # Whether an existing row with the same bytes answers the upload without checking the file.
    reuse: Callable[[Any, Receiver], bool] = lambda row, upload: True


def _check_storage(session: Session, tenant: str, size: int, settings: Settings) -> None:
    """413 when the tenant's stored bytes plus this file would pass its quota."""
    limit = keys.quotas_of(session, tenant=tenant, settings=settings)["max_stored_bytes"]
    used = repository.stored_bytes(session, tenant=tenant)
    if used + size > limit:
        raise Refused(
            413,
            f"tenant {tenant!r} stores {used} bytes ({_human(used)}) of datasets and models; this "
            f"file's {size} bytes would pass its quota of {limit} bytes ({_human(limit)}); delete "
            "some, or ask an admin to raise the quota (gradtune keys quota)",
        )


def remove_unused_object(session: Session, store: ArtifactStore, sha256: str, logger: logging.Logger) -> None:
    """Remove the stored object unless a row of any tenant holds it, under the object's lock
    (repository.lock_object), so that an upload recording a row of it cannot slip in between."""
    try:
        repository.lock_object(session, sha256=sha256)
        if not repository.object_in_use(session, sha256=sha256):
            store.delete(sha256)
        session.commit()
    except StoreError as exc:  # an orphaned object only costs space
        session.rollback()
        logger.warning("could not remove the unused object %s: %s", sha256, exc)


def _store(request: Request, upload: Receiver, kind: UploadKind, tenant: str) -> tuple[Any, bool]:
    """Check, store and record the uploaded file for ``tenant``; (the public row, whether it is new).
    The same bytes as another tenant's file make a row of this tenant's (sharing the stored object);
    the object is written again all the same, so that the answer takes as long as for new bytes and
    says nothing about what other tenants hold."""
    app = request.app
    store = app.state.store
    settings = app.state.settings
    sha256 = upload.sha.hexdigest()
    assert upload.path is not None and upload.filename and upload.format
    with app.state.sessionmaker() as session:
        existing = kind.get_by_sha256(session, sha256=sha256, tenant=tenant)
        if existing is not None and kind.reuse(existing, upload):
            store.put_file(sha256, upload.path)  # no-op when present; heals a lost object
            return kind.to_public(existing), False
        _check_storage(session, tenant, upload.size, settings)
    facts = kind.check(upload, settings)
    store.put_file(sha256, upload.path, overwrite=True)
    with app.state.sessionmaker() as session:
        try:
            # Under the object's lock, a delete of another row of these bytes cannot remove the object
            # between this check and the commit; under the tenant's, another upload cannot pass the
            # storage quota at the same time.
            repository.lock_object(session, sha256=sha256)
            repository.lock_tenant(session, tenant=tenant)
            _check_storage(session, tenant, upload.size, settings)
            if not store.exists(sha256):  # removed meanwhile, with the last other row of these bytes
                store.put_file(sha256, upload.path)
            row = kind.create(session, upload, sha256, facts, tenant)
            session.commit()
            return kind.to_public(row), True
        except IntegrityError:  # the same bytes, uploaded concurrently by this tenant, won the race
            session.rollback()
            existing = kind.get_by_sha256(session, sha256=sha256, tenant=tenant)
            if existing is None:
                raise
            return kind.to_public(existing), False
        except BaseException:
            session.rollback()
            remove_unused_object(session, store, sha256, kind.logger)
            raise


def _slots(app: Any) -> threading.BoundedSemaphore:
    """The app's upload slots (``GRADTUNE_MAX_CONCURRENT_UPLOADS``), made on first use; only the
    event loop's thread calls this, so the first use cannot race."""
    slots = getattr(app.state, "upload_semaphore", None)
    if slots is None:
        slots = app.state.upload_semaphore = threading.BoundedSemaphore(app.state.settings.max_concurrent_uploads)
    return slots


async def upload(request: Request, response: Response, kind: UploadKind, principal: Principal) -> Any:
    """The body of an upload route: receive, check, store, record; 201 with ``Location`` for new
    bytes, 200 with the existing row for bytes uploaded before. Refusals answer their status
    (413 with ``Connection: close``), an unavailable artifact store 503. The tenant's uploads in
    progress are counted in the database (service/upload_quota.py), across API processes: one past
    its quota is answered 429 with ``Retry-After`` before its body is read. At most
    ``GRADTUNE_MAX_CONCURRENT_UPLOADS`` uploads are received and checked at once by this process
    (each may hold a temporary file and a reader's bounded memory); one more is answered at once,
    before its body is read, with 503 and ``Retry-After``."""
    app = request.app
    settings = app.state.settings
    tenant = principal.tenant
    taken = await run_in_threadpool(_take_slot, app, tenant)
    if taken.limit == 0:  # waiting would not help
        raise HTTPException(
            status_code=403,
            detail=f"tenant {tenant!r} may not upload: its quota of uploads in progress is 0 (gradtune keys quota)",
            headers={"Connection": "close"},
        )
    slot = taken.slot
    if slot is None:
        raise retry_later(
            f"tenant {tenant!r} has {taken.in_progress} uploads in progress, its limit is {taken.limit} "
            f"(gradtune keys quota); try again in {UPLOAD_RETRY_AFTER} seconds",
            UPLOAD_RETRY_AFTER,
            headers={"Connection": "close"},
            status_code=429,
        )
    try:
        slots = _slots(app)
        if not slots.acquire(blocking=False):
            raise retry_later(
                f"{settings.max_concurrent_uploads} uploads are already being received and checked "
                f"(GRADTUNE_MAX_CONCURRENT_UPLOADS); try again in {UPLOAD_RETRY_AFTER} seconds",
                UPLOAD_RETRY_AFTER,
                headers={"Connection": "close"},
            )
        try:
            return await _upload(request, response, kind, settings, tenant)
        finally:
            slots.release()
    finally:
        with anyio.CancelScope(shield=True):  # also when the request is cancelled
            await run_in_threadpool(upload_quota.release, app.state.sessionmaker, slot)


def _take_slot(app: Any, tenant: str) -> upload_quota.Taken:
    with app.state.sessionmaker() as session:
        return upload_quota.take(session, tenant=tenant, settings=app.state.settings)


async def _upload(request: Request, response: Response, kind: UploadKind, settings: Settings, tenant: str) -> Any:
    received: Receiver | None = None
    try:
        received = await receive(
            request,
            settings.max_upload_bytes,
            settings.tmp_dir(),
            check_name=kind.check_name,
            example=kind.example,
            extensions=kind.extensions,
        )
        row, created = await run_in_threadpool(_store, request, received, kind, tenant)
    except Refused as exc:
        headers = {"Connection": "close"} if exc.status_code == 413 else None
        raise HTTPException(status_code=exc.status_code, detail=exc.detail, headers=headers) from None
    except StoreError as exc:
        kind.logger.error("artifact store unavailable: %s", exc)
        raise HTTPException(
            status_code=503, detail=f"the artifact store is unavailable; try again later ({exc})"
        ) from None
    finally:
        if received is not None:
            received.cleanup()
    response.headers["Location"] = f"{kind.location}/{row.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return row


def delete(session: Session, store: ArtifactStore, kind: UploadKind, row_id: str, tenant: str | None) -> Response:
    """The body of a delete route: 404 for an unknown id (or another tenant's, unless ``tenant`` is
    None), 409 while a queued or running job uses the row, else 204; the stored object goes after
    the commit unless a row (of any tenant) still holds its bytes."""
    try:
        row = kind.delete(session, row_id, tenant)
    except kind.not_found as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except repository.Conflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    sha256 = row.sha256
    session.commit()
    # After the commit; unless a row of any tenant holds the same bytes (as a dataset or a model).
    remove_unused_object(session, store, sha256, kind.logger)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------- OpenAPI descriptions


def not_found_response(noun: str) -> dict[str, Any]:
    return {
        "model": Message,
        "description": f"No {noun} with that id.",
        "content": {"application/json": {"example": {"detail": f"{noun} 0b6f... not found"}}},
    }


def bad_file_response(description: str, msg: str, type_: str) -> dict[str, Any]:
    """The 422 answer of an upload route, with one example field error."""
    return {
        "model": ValidationErrorBody,
        "description": description,
        "content": {
            "application/json": {
                "example": {"detail": [{"loc": ["body", FIELD], "field": FIELD, "msg": msg, "type": type_}]}
            }
        },
    }


def request_body(description: str) -> dict[str, Any]:
    """An upload route's ``openapi_extra``: one file in the multipart field ``file``."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FIELD],
                        "properties": {FIELD: {"type": "string", "format": "binary", "description": description}},
                    }
                }
            },
        }
    }


def upload_responses(kind: UploadKind, public: type, bad_file: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """An upload route's ``responses``."""
    return {
        200: {"model": public, "description": f"These bytes were uploaded before: the existing {kind.noun}."},
        201: {
            "description": f"Stored. `Location` names the {kind.noun}'s URL.",
            "headers": {"Location": {"description": f"{kind.location}/<id>", "schema": {"type": "string"}}},
        },
        400: {"model": Message, "description": "The multipart body is malformed or incomplete."},
        403: {"model": Message, "description": "The tenant's quota of uploads in progress is 0."},
        413: {
            "model": Message,
            "description": "The file is larger than GRADTUNE_MAX_UPLOAD_BYTES, or would pass the tenant's "
            "quota of stored bytes.",
        },
        415: {"model": Message, "description": "The body is not multipart/form-data."},
        422: bad_file,
        503: {
            "model": Message,
            "description": "The artifact store is unavailable, or GRADTUNE_MAX_CONCURRENT_UPLOADS uploads are "
            "in progress (`Retry-After` says when to try again).",
        },
        429: {
            "model": Message,
            "description": "The tenant has its quota of uploads in progress (`Retry-After`).",
        },
    }


def delete_responses(noun: str) -> dict[int | str, dict[str, Any]]:
    """A delete route's ``responses``."""
    return {
        404: not_found_response(noun),
        409: {"model": Message, "description": f"A queued or running job uses the {noun}."},
    }
