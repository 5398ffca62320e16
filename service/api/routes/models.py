"""/v1/models: upload an exported PyTorch program (``torch.export.save`` -> ``.pt2``), list,
describe and delete models.

The upload streams exactly like a dataset's (service/api/uploads.py: multipart parsed as
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
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from sqlalchemy.orm import Session

from service import repository
from service.api.auth import PrincipalDep, TenantQuery, listing_scope
from service.api.deps import MAX_OFFSET, SessionDep, StoreDep
from service.api.uploads import (
    Receiver,
    UploadKind,
    bad_file_response,
    delete,
    delete_responses,
    file_error,
    not_found_response,
    request_body,
    upload,
    upload_responses,
)
from service.exported_files import ExportedProgramError, describe_program, read_pt2
from service.schemas import ModelPublic, ModelsPublic, Text
from service.settings import Settings

logger = logging.getLogger("service.api.models")

router = APIRouter(prefix="/v1/models", tags=["models"])

UPLOAD_PATH = "/v1/models"  # streamed past the body-size middleware (see service.main)

ModelId = Annotated[Text, PathParam(description="The model id returned by POST /v1/models.")]


class ModelFileError(ValueError):
    code = "unsupported_format"


def model_format(filename: str) -> str:
    """``"pt2"`` for a ``.pt2`` file name, else ModelFileError with a sentence."""
    suffix = Path(filename).suffix.lower()
    if suffix == ".pt2":
        return "pt2"
    got = f"extension {suffix!r}" if suffix else "no extension"
    raise ModelFileError(
        f"{filename!r} has {got}; upload a .pt2 file written by "
        "torch.export.save(torch.export.export(model, (x,)), path)"
    )


_NOT_FOUND = not_found_response("model")
_BAD_FILE = bad_file_response(
    "The archive was refused: `msg` names the file and the reason. Nothing was stored.",
    "net.pt2: node 3 calls 'softmax.int', which gradtune cannot train through; "
    "supported: avg_pool2d, conv2d, flatten, gelu, linear, max_pool2d, relu, sigmoid, tanh",
    "unsupported_program",
)


def _describe(received: Receiver, settings: Settings) -> dict[str, Any]:
    assert received.path is not None  # a completed upload (see upload())
    try:
        return describe_program(read_pt2(received.path, max_bytes=settings.max_dataset_bytes))
    except ExportedProgramError as exc:
        raise file_error(f"{received.filename}: {exc}", "unsupported_program") from None


def _create(session: Session, received: Receiver, sha256: str, program: dict[str, Any], tenant: str) -> Any:
    assert received.filename is not None  # a completed upload
    return repository.create_model(
        session, filename=received.filename, sha256=sha256, size=received.size, program=program, tenant=tenant
    )


_UPLOAD = UploadKind(
    noun="model",
    location=UPLOAD_PATH,
    logger=logger,
    check_name=model_format,
    example="model.pt2",
    extensions=".pt2",
    check=_describe,
    get_by_sha256=repository.get_model_by_sha256,
    create=_create,
    to_public=repository.model_to_public,
    delete=lambda session, model_id, tenant: repository.delete_model(session, model_id=model_id, tenant=tenant),
    not_found=repository.ModelNotFound,
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelPublic,
    summary="Upload an exported PyTorch model (.pt2)",
    openapi_extra=request_body("a .pt2 archive written by torch.export.save"),
    responses=upload_responses(_UPLOAD, ModelPublic, _BAD_FILE),
)
async def upload_model(request: Request, response: Response, principal: PrincipalDep) -> ModelPublic:
    """Upload one `.pt2` archive (`torch.export.save(torch.export.export(model, (x,)), path)`) in
    the multipart field `file`. The archive is read as data, never unpickled or executed: the
    program must have static shapes, one input tensor, one (rows, outputs) result, parameters only
    (no buffers or constants), float32/float64 weights and only the operators linear, conv2d,
    relu, tanh, sigmoid, gelu, max_pool2d, avg_pool2d, flatten. The answer describes it: the shape
    of one example, the output width, the operators in call order and the parameters (with the
    program's own names) in call order. Anything else is refused with 422 and the reason."""
    return await upload(request, response, _UPLOAD, principal)


@router.get("", response_model=ModelsPublic, summary="List uploaded models, newest first")
def list_models(
    session: SessionDep,
    principal: PrincipalDep,
    tenant: TenantQuery = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Models to skip.")] = 0,
) -> ModelsPublic:
    items, total = repository.list_models(session, tenant=listing_scope(principal, tenant), limit=limit, offset=offset)
    return ModelsPublic(items=[repository.model_to_public(m) for m in items], total=total, limit=limit, offset=offset)


@router.get("/{model_id}", response_model=ModelPublic, summary="A model's description", responses={404: _NOT_FOUND})
def get_model(model_id: ModelId, session: SessionDep, principal: PrincipalDep) -> ModelPublic:
    model = repository.get_model(session, model_id=model_id, tenant=principal.scope())
    if model is None:
        raise HTTPException(status_code=404, detail=f"model {model_id} not found")
    return repository.model_to_public(model)


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a model and its stored file",
    responses=delete_responses("model"),
)
def delete_model(model_id: ModelId, session: SessionDep, store: StoreDep, principal: PrincipalDep) -> Response:
    """Refused with 409 while a queued or running job names the model."""
    return delete(session, store, _UPLOAD, model_id, principal.scope())
