"""/v1/datasets: upload a dataset file, list, describe and delete datasets.

An upload streams: the multipart body is parsed as it arrives, the file part written to a
temporary file under ``<data_dir>/tmp`` in chunks while it is hashed and counted, and refused
with 413 as soon as it passes ``GRADTUNE_MAX_UPLOAD_BYTES`` (the body-size middleware lets this
one route through unbuffered). The file is then checked (``service.dataset_files``), stored in
the artifact store under its sha256, and described in the database. Whatever goes wrong, the
temporary file is removed, and a refused file leaves no row and no stored object.

The same bytes uploaded twice are one dataset: the second upload answers 200 with the dataset
the first one created (201). The flow is service.api.uploads', shared with /v1/models.
"""

from __future__ import annotations

import logging
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
from service.dataset_files import DatasetFileError, format_for, inspect_file
from service.schemas import DatasetPublic, DatasetsPublic, Text
from service.settings import Settings

logger = logging.getLogger("service.api.datasets")

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_PATH = "/v1/datasets"  # streamed past the body-size middleware (see service.main)

DatasetId = Annotated[Text, PathParam(description="The dataset id returned by POST /v1/datasets.")]

_NOT_FOUND = not_found_response("dataset")
_BAD_FILE = bad_file_response(
    "The file was refused: `msg` names the file, the tensor or column (and row) and the reason. Nothing was stored.",
    "data.csv: the CSV rows are ragged: line 7 has 3 cells but the header has 4 columns",
    "ragged_rows",
)


def _inspect(received: Receiver, settings: Settings) -> dict[str, Any]:
    assert received.path is not None and received.format is not None  # a completed upload (see upload())
    try:
        return inspect_file(received.path, received.format, max_decoded_bytes=settings.max_dataset_bytes)
    except DatasetFileError as exc:
        raise file_error(f"{received.filename}: {exc}", exc.code) from None


def _create(session: Session, received: Receiver, sha256: str, facts: dict[str, Any], tenant: str) -> Any:
    assert received.filename is not None and received.format is not None  # a completed upload
    return repository.create_dataset(
        session,
        filename=received.filename,
        format=received.format,
        sha256=sha256,
        size=received.size,
        facts=facts,
        tenant=tenant,
    )


_UPLOAD = UploadKind(
    noun="dataset",
    location=UPLOAD_PATH,
    logger=logger,
    check_name=format_for,
    example="data.npz",
    extensions=".safetensors, .npz, .csv or .parquet",
    check=_inspect,
    get_by_sha256=repository.get_dataset_by_sha256,
    create=_create,
    to_public=repository.dataset_to_public,
    delete=lambda session, dataset_id, tenant: repository.delete_dataset(session, dataset_id=dataset_id, tenant=tenant),
    not_found=repository.DatasetNotFound,
    reuse=lambda existing, received: existing.format == received.format,
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    summary="Upload a dataset file",
    openapi_extra=request_body(".safetensors, .npz, .csv or .parquet"),
    responses=upload_responses(_UPLOAD, DatasetPublic, _BAD_FILE),
)
async def upload_dataset(request: Request, response: Response, principal: PrincipalDep) -> DatasetPublic:
    """Upload one file in the multipart field `file`: `.safetensors`, `.npz` (numeric arrays
    only, never pickle), `.csv` (a header row, then numbers) or `.parquet` (numeric columns).

    The answer lists the tensors (or columns) found, with shape, dtype, min, max and whether
    every value is a whole number. NaN or infinity anywhere, a truncated or corrupt file, or a
    wrong extension is refused with 422 naming the problem; nothing is stored then."""
    return await upload(request, response, _UPLOAD, principal)


@router.get("", response_model=DatasetsPublic, summary="List datasets, newest first")
def list_datasets(
    session: SessionDep,
    principal: PrincipalDep,
    tenant: TenantQuery = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Datasets to skip.")] = 0,
) -> DatasetsPublic:
    items, total = repository.list_datasets(
        session, tenant=listing_scope(principal, tenant), limit=limit, offset=offset
    )
    return DatasetsPublic(
        items=[repository.dataset_to_public(d) for d in items], total=total, limit=limit, offset=offset
    )


@router.get(
    "/{dataset_id}",
    response_model=DatasetPublic,
    summary="A dataset's description",
    responses={404: _NOT_FOUND},
)
def get_dataset(dataset_id: DatasetId, session: SessionDep, principal: PrincipalDep) -> DatasetPublic:
    dataset = repository.get_dataset(session, dataset_id=dataset_id, tenant=principal.scope())
    if dataset is None:
        raise HTTPException(status_code=404, detail=f"dataset {dataset_id} not found")
    return repository.dataset_to_public(dataset)


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a dataset and its stored file",
    responses=delete_responses("dataset"),
)
def delete_dataset(dataset_id: DatasetId, session: SessionDep, store: StoreDep, principal: PrincipalDep) -> Response:
    """Refused with 409 while a queued or running job names the dataset."""
    return delete(session, store, _UPLOAD, dataset_id, principal.scope())
