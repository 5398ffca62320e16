"""/v1/datasets: upload a dataset file, list, describe and delete datasets.

An upload streams: the multipart body is parsed as it arrives, the file part written to a
temporary file under ``<data_dir>/tmp`` in chunks while it is hashed and counted, and refused
with 413 as soon as it passes ``GRADTUNE_MAX_UPLOAD_BYTES`` (the body-size middleware lets this
one route through unbuffered). The file is then checked (``service.dataset_files``), stored in
the artifact store under its sha256, and described in the database. Whatever goes wrong, the
temporary file is removed, and a refused file leaves no row and no stored object.

The same bytes uploaded twice are one dataset: the second upload answers 200 with the dataset
the first one created (201).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path as PathParam, Query, Request, Response, status
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service import repository
from service.api.deps import SessionDep, StoreDep
from service.api.errors import Message, ValidationErrorBody
from service.dataset_files import DatasetFileError, format_for, inspect_file
from service.schemas import DatasetPublic, DatasetsPublic
from service.storage import StoreError

logger = logging.getLogger("service.api.datasets")

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_PATH = "/v1/datasets"  # streamed past the body-size middleware (see service.main)
FIELD = "file"
# Multipart framing around the file (boundaries, part headers, small extra fields).
FRAMING_BYTES = 64 * 1024

DatasetId = Annotated[str, PathParam(description="The dataset id returned by POST /v1/datasets.")]

_NOT_FOUND = {
    "model": Message,
    "description": "No dataset with that id.",
    "content": {"application/json": {"example": {"detail": "dataset 0b6f... not found"}}},
}
_BAD_FILE = {
    "model": ValidationErrorBody,
    "description": "The file was refused: `msg` names the file, the tensor or column (and row) "
    "and the reason. Nothing was stored.",
    "content": {
        "application/json": {
            "example": {
                "detail": [
                    {
                        "loc": ["body", "file"],
                        "field": "file",
                        "msg": "data.csv: the CSV rows are ragged: line 7 has 3 cells but the "
                        "header has 4 columns",
                        "type": "ragged_rows",
                    }
                ]
            }
        }
    },
}


class _TooLarge(Exception):
    pass


class _Refused(Exception):
    """A problem with the upload itself: HTTP status, and the sentence or field error to answer."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status_code = status_code
        self.detail = detail


def _file_error(msg: str, type_: str) -> _Refused:
    return _Refused(422, [{"loc": ["body", FIELD], "field": FIELD, "msg": msg, "type": type_}])


def _clean_filename(raw: bytes, extensions: str = ".safetensors, .npz, .csv or .parquet") -> str:
    name = raw.decode("utf-8", errors="replace")
    name = re.split(r"[\\/]", name)[-1]  # browsers and curl may send a path
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if not name or name in (".", ".."):
        raise _file_error(
            f"the file part has an empty filename; name the file with its extension ({extensions})",
            "missing_filename",
        )
    if len(name) > 255:
        raise _file_error(f"the filename is {len(name)} characters long; at most 255 are allowed", "filename_too_long")
    return name


class _Receiver:
    """python-multipart callbacks: the part named ``file`` goes to a temporary file, hashed and
    counted as it streams; other parts are skipped (and limited in size).

    ``check_name(filename) -> format`` refuses a wrong extension (an exception with ``code``)
    before any of the file is written; ``example`` is the file named in hints (curl -F ...)."""

    def __init__(self, tmp_dir: Path, limit: int, check_name: Callable[[str], str] = format_for,
                 example: str = "data.npz", extensions: str = ".safetensors, .npz, .csv or .parquet") -> None:
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
        self._fh = None
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
            raise _file_error("the upload holds more than one part named 'file'; send one file per request", "too_many_files")
        if b"filename" not in params:
            raise _file_error(
                "the 'file' part is not a file (it has no filename); send it as a file, e.g. "
                f"curl -F file=@{self.example}",
                "missing_filename",
            )
        self.filename = _clean_filename(params[b"filename"], self.extensions)
        try:
            self.format = self.check_name(self.filename)  # refuse a wrong extension before reading on
        except ValueError as exc:
            raise _file_error(str(exc), getattr(exc, "code", "unsupported_format")) from None
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
        self._fh.write(chunk)

    def on_part_end(self) -> None:
        if self._in_file:
            self._fh.close()
            self._in_file = False
            self.file_done = True

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in (
                "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
                "on_headers_finished", "on_part_data", "on_part_end", "on_end",
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


def _too_large(limit: int, filename: str | None) -> _Refused:
    what = f"file {filename!r}" if filename else "the upload"
    return _Refused(
        413,
        f"{what} is larger than the upload limit of {limit} bytes ({_human(limit)}, "
        "GRADTUNE_MAX_UPLOAD_BYTES)",
    )


async def _receive(request: Request, limit: int, tmp_dir: Path, **receiver_options: Any) -> _Receiver:
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    content_type = request.headers.get("content-type", "")
    media, params = parse_options_header(content_type)
    if media != b"multipart/form-data":
        got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise _Refused(
            415,
            f"upload the file as multipart/form-data in a field named 'file', got {got} "
            f"(with curl: -F file=@{receiver_options.get('example', 'data.npz')})",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise _Refused(400, "the multipart/form-data Content-Type has no boundary")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + FRAMING_BYTES:
        raise _too_large(limit, None)

    receiver = _Receiver(tmp_dir, limit, **receiver_options)
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
        raise _Refused(400, f"the multipart body is malformed: {exc}") from None
    except ClientDisconnect:
        receiver.cleanup()
        raise _Refused(400, "the client disconnected before the upload was complete") from None
    except BaseException:
        receiver.cleanup()
        raise
    if receiver.path is None:
        receiver.cleanup()
        raise _Refused(
            422,
            [{"loc": ["body", FIELD], "field": FIELD, "msg": "Field required: send the file in a "
              f"multipart field named 'file' (curl -F file=@{receiver.example})", "type": "missing"}],
        )
    if not (receiver.file_done and receiver.ended):
        receiver.cleanup()
        raise _Refused(400, "the multipart body ended before its closing boundary: the upload is incomplete")
    return receiver


def _store(request: Request, upload: _Receiver) -> tuple[DatasetPublic, bool]:
    """Check, store and record the uploaded file; (the dataset, whether it is new)."""
    app = request.app
    settings = app.state.settings
    store = app.state.store
    sha256 = upload.sha.hexdigest()
    assert upload.path is not None and upload.filename and upload.format
    with app.state.sessionmaker() as session:
        existing = repository.get_dataset_by_sha256(session, sha256=sha256)
        if existing is not None and existing.format == upload.format:
            store.put_file(sha256, upload.path)  # no-op when present; heals a lost object
            return repository.dataset_to_public(existing), False
    try:
        facts = inspect_file(upload.path, upload.format, max_decoded_bytes=settings.max_dataset_bytes)
    except DatasetFileError as exc:
        raise _file_error(f"{upload.filename}: {exc}", exc.code) from None
    store.put_file(sha256, upload.path)
    with app.state.sessionmaker() as session:
        try:
            row = repository.create_dataset(
                session, filename=upload.filename, format=upload.format, sha256=sha256,
                size=upload.size, facts=facts,
            )
            session.commit()
            return repository.dataset_to_public(row), True
        except IntegrityError:  # the same bytes, uploaded concurrently, won the race
            session.rollback()
            existing = repository.get_dataset_by_sha256(session, sha256=sha256)
            if existing is None:
                raise
            return repository.dataset_to_public(existing), False
        except BaseException:
            session.rollback()
            if repository.get_dataset_by_sha256(session, sha256=sha256) is None:
                try:
                    store.delete(sha256)
                except StoreError:
                    logger.warning("could not remove object %s after a failed upload", sha256)
            raise


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    summary="Upload a dataset file",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FIELD],
                        "properties": {
                            FIELD: {
                                "type": "string",
                                "format": "binary",
                                "description": ".safetensors, .npz, .csv or .parquet",
                            }
                        },
                    }
                }
            },
        }
    },
    responses={
        200: {"model": DatasetPublic, "description": "These bytes were uploaded before: the existing dataset."},
        201: {
            "description": "Stored. `Location` names the dataset's URL.",
            "headers": {"Location": {"description": "/v1/datasets/<id>", "schema": {"type": "string"}}},
        },
        400: {"model": Message, "description": "The multipart body is malformed or incomplete."},
        413: {"model": Message, "description": "The file is larger than GRADTUNE_MAX_UPLOAD_BYTES."},
        415: {"model": Message, "description": "The body is not multipart/form-data."},
        422: _BAD_FILE,
        503: {"model": Message, "description": "The artifact store is unavailable."},
    },
)
async def upload_dataset(request: Request, response: Response) -> DatasetPublic:
    """Upload one file in the multipart field `file`: `.safetensors`, `.npz` (numeric arrays
    only, never pickle), `.csv` (a header row, then numbers) or `.parquet` (numeric columns).

    The answer lists the tensors (or columns) found, with shape, dtype, min, max and whether
    every value is a whole number. NaN or infinity anywhere, a truncated or corrupt file, or a
    wrong extension is refused with 422 naming the problem; nothing is stored then."""
    settings = request.app.state.settings
    upload: _Receiver | None = None
    try:
        upload = await _receive(request, settings.max_upload_bytes, settings.tmp_dir())
        dataset, created = await run_in_threadpool(_store, request, upload)
    except _Refused as exc:
        headers = {"Connection": "close"} if exc.status_code == 413 else None
        raise HTTPException(status_code=exc.status_code, detail=exc.detail, headers=headers) from None
    except StoreError as exc:
        logger.error("artifact store unavailable: %s", exc)
        raise HTTPException(
            status_code=503, detail=f"the artifact store is unavailable; try again later ({exc})"
        ) from None
    finally:
        if upload is not None:
            upload.cleanup()
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return dataset


@router.get("", response_model=DatasetsPublic, summary="List datasets, newest first")
def list_datasets(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    offset: Annotated[int, Query(ge=0, description="Datasets to skip.")] = 0,
) -> DatasetsPublic:
    items, total = repository.list_datasets(session, limit=limit, offset=offset)
    return DatasetsPublic(
        items=[repository.dataset_to_public(d) for d in items], total=total, limit=limit, offset=offset
    )


@router.get(
    "/{dataset_id}", response_model=DatasetPublic, summary="A dataset's description",
    responses={404: _NOT_FOUND},
)
def get_dataset(dataset_id: DatasetId, session: SessionDep) -> DatasetPublic:
    dataset = repository.get_dataset(session, dataset_id=dataset_id)
    if dataset is None:
        raise HTTPException(status_code=404, detail=f"dataset {dataset_id} not found")
    return repository.dataset_to_public(dataset)


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a dataset and its stored file",
    responses={
        404: _NOT_FOUND,
        409: {"model": Message, "description": "A queued or running job uses the dataset."},
    },
)
def delete_dataset(dataset_id: DatasetId, session: SessionDep, store: StoreDep) -> Response:
    """Refused with 409 while a queued or running job names the dataset."""
    try:
        dataset = repository.delete_dataset(session, dataset_id=dataset_id)
    except repository.DatasetNotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except repository.Conflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    sha256 = dataset.sha256
    session.commit()
    # After the commit; unless the same bytes were uploaded again meanwhile (as a dataset or a model).
    if repository.get_dataset_by_sha256(session, sha256=sha256) is None and \
            repository.get_model_by_sha256(session, sha256=sha256) is None:
        try:
            store.delete(sha256)
        except StoreError as exc:  # the row is gone; an orphaned object only costs space
            logger.warning("dataset %s deleted but its object was not: %s", dataset_id, exc)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
