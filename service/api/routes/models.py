"""/v1/models: upload an exported PyTorch program (``torch.export.save`` -> ``.pt2``), list,
describe and delete models.

The upload streams exactly like a dataset's (service/api/routes/datasets.py: multipart parsed as
it arrives, the file spooled under ``<data_dir>/tmp`` while it is hashed, 413 past
``GRADTUNE_MAX_UPLOAD_BYTES``). The archive is then read as data by service.exported_files
(``read_pt2``: zipfile and json only, never ``torch.export.load`` and never pickle) and
summarized (``describe_program``); a refused archive answers 422 with the reader's sentence and
leaves no row, no stored object and no temporary file. Accepted files are stored in the artifact
store under their sha256: the same bytes uploaded twice are one model (200 the second time).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path as PathParam, Query, Request, Response, status
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from service import repository
from service.api.deps import SessionDep, StoreDep
from service.api.errors import Message, ValidationErrorBody
from service.api.routes.datasets import FIELD, _file_error, _receive, _Receiver, _Refused
from service.exported_files import ExportedProgramError, describe_program, read_pt2
from service.schemas import ModelPublic, ModelsPublic
from service.storage import StoreError

logger = logging.getLogger("service.api.models")

router = APIRouter(prefix="/v1/models", tags=["models"])

UPLOAD_PATH = "/v1/models"  # streamed past the body-size middleware (see service.main)

ModelId = Annotated[str, PathParam(description="The model id returned by POST /v1/models.")]


class ModelFileError(ValueError):
    code = "unsupported_format"


def model_format(filename: str) -> str:
    """``"pt2"`` for a ``.pt2`` file name, else ModelFileError with a sentence."""
    suffix = Path(filename).suffix.lower()
    if suffix == ".pt2":
        return "pt2"
    got = f"extension {suffix!r}" if suffix else "no extension"
    raise ModelFileError(
        f"{filename!r} has {got}; upload a .pt2 file written by torch.export.save(torch.export.export(model, (x,)), path)"
    )


_NOT_FOUND = {
    "model": Message,
    "description": "No model with that id.",
    "content": {"application/json": {"example": {"detail": "model 0b6f... not found"}}},
}
_BAD_FILE = {
    "model": ValidationErrorBody,
    "description": "The archive was refused: `msg` names the file and the reason. Nothing was stored.",
    "content": {
        "application/json": {
            "example": {
                "detail": [
                    {
                        "loc": ["body", "file"],
                        "field": "file",
                        "msg": "net.pt2: node 3 calls 'softmax.int', which gradtune cannot train through; "
                        "supported: avg_pool2d, conv2d, flatten, gelu, linear, max_pool2d, relu, sigmoid, tanh",
                        "type": "unsupported_program",
                    }
                ]
            }
        }
    },
}


def _store(request: Request, upload: _Receiver) -> tuple[ModelPublic, bool]:
    """Read, store and record the uploaded archive; (the model, whether it is new)."""
    app = request.app
    settings = app.state.settings
    store = app.state.store
    sha256 = upload.sha.hexdigest()
    assert upload.path is not None and upload.filename
    with app.state.sessionmaker() as session:
        existing = repository.get_model_by_sha256(session, sha256=sha256)
        if existing is not None:
            store.put_file(sha256, upload.path)  # no-op when present; heals a lost object
            return repository.model_to_public(existing), False
    try:
        summary = describe_program(read_pt2(upload.path, max_bytes=settings.max_dataset_bytes))
    except ExportedProgramError as exc:
        raise _file_error(f"{upload.filename}: {exc}", "unsupported_program") from None
    store.put_file(sha256, upload.path)
    with app.state.sessionmaker() as session:
        try:
            row = repository.create_model(
                session, filename=upload.filename, sha256=sha256, size=upload.size, program=summary
            )
            session.commit()
            return repository.model_to_public(row), True
        except IntegrityError:  # the same bytes, uploaded concurrently, won the race
            session.rollback()
            existing = repository.get_model_by_sha256(session, sha256=sha256)
            if existing is None:
                raise
            return repository.model_to_public(existing), False
        except BaseException:
            session.rollback()
            if repository.get_model_by_sha256(session, sha256=sha256) is None:
                try:
                    store.delete(sha256)
                except StoreError:
                    logger.warning("could not remove object %s after a failed upload", sha256)
            raise


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelPublic,
    summary="Upload an exported PyTorch model (.pt2)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FIELD],
                        "properties": {
                            FIELD: {"type": "string", "format": "binary",
                                    "description": "a .pt2 archive written by torch.export.save"}
                        },
                    }
                }
            },
        }
    },
    responses={
        200: {"model": ModelPublic, "description": "These bytes were uploaded before: the existing model."},
        201: {
            "description": "Stored. `Location` names the model's URL.",
            "headers": {"Location": {"description": "/v1/models/<id>", "schema": {"type": "string"}}},
        },
        400: {"model": Message, "description": "The multipart body is malformed or incomplete."},
        413: {"model": Message, "description": "The file is larger than GRADTUNE_MAX_UPLOAD_BYTES."},
        415: {"model": Message, "description": "The body is not multipart/form-data."},
        422: _BAD_FILE,
        503: {"model": Message, "description": "The artifact store is unavailable."},
    },
)
async def upload_model(request: Request, response: Response) -> ModelPublic:
    """Upload one `.pt2` archive (`torch.export.save(torch.export.export(model, (x,)), path)`) in
    the multipart field `file`. The archive is read as data, never unpickled or executed: the
    program must have static shapes, one input tensor, one (rows, outputs) result, parameters only
    (no buffers or constants), float32/float64 weights and only the operators linear, conv2d,
    relu, tanh, sigmoid, gelu, max_pool2d, avg_pool2d, flatten. The answer describes it: the shape
    of one example, the output width, the operators in call order and the parameters (with the
    program's own names) in call order. Anything else is refused with 422 and the reason."""
    settings = request.app.state.settings
    upload: _Receiver | None = None
    try:
        upload = await _receive(request, settings.max_upload_bytes, settings.tmp_dir(),
                                check_name=model_format, example="model.pt2", extensions=".pt2")
        model, created = await run_in_threadpool(_store, request, upload)
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
    response.headers["Location"] = f"/v1/models/{model.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return model


@router.get("", response_model=ModelsPublic, summary="List uploaded models, newest first")
def list_models(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    offset: Annotated[int, Query(ge=0, description="Models to skip.")] = 0,
) -> ModelsPublic:
    items, total = repository.list_models(session, limit=limit, offset=offset)
    return ModelsPublic(items=[repository.model_to_public(m) for m in items], total=total, limit=limit, offset=offset)


@router.get("/{model_id}", response_model=ModelPublic, summary="A model's description", responses={404: _NOT_FOUND})
def get_model(model_id: ModelId, session: SessionDep) -> ModelPublic:
    model = repository.get_model(session, model_id=model_id)
    if model is None:
        raise HTTPException(status_code=404, detail=f"model {model_id} not found")
    return repository.model_to_public(model)


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a model and its stored file",
    responses={404: _NOT_FOUND, 409: {"model": Message, "description": "A queued or running job uses the model."}},
)
def delete_model(model_id: ModelId, session: SessionDep, store: StoreDep) -> Response:
    """Refused with 409 while a queued or running job names the model."""
    try:
        model = repository.delete_model(session, model_id=model_id)
    except repository.ModelNotFound as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except repository.Conflict as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    sha256 = model.sha256
    session.commit()
    # After the commit; unless the same bytes were uploaded again meanwhile (as a model or a dataset).
    if repository.get_model_by_sha256(session, sha256=sha256) is None and \
            repository.get_dataset_by_sha256(session, sha256=sha256) is None:
        try:
            store.delete(sha256)
        except StoreError as exc:
            logger.warning("model %s deleted but its object was not: %s", model_id, exc)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
