"""/v1/studies: settings that keep learning across the jobs that name a study (service/studies.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from sqlalchemy.orm import Session

from service import studies
from service.api.auth import PrincipalDep, TenantQuery, listing_scope
from service.api.deps import MAX_OFFSET, ReadSessionDep, SessionDep, require_json
from service.api.errors import Message, ValidationErrorBody
from service.db.models import Study
from service.schemas import JobCreate, Text
from service.study_schemas import (
    StudiesPublic,
    StudyCreate,
    StudyHistoryPublic,
    StudyPublic,
    StudySettingsPublic,
)

router = APIRouter(prefix="/v1/studies", tags=["studies"])

StudyId = Annotated[Text, Path(description="The study id returned by POST /v1/studies.")]

_NOT_FOUND = {
    "model": Message,
    "description": "No study with that id (or another tenant's).",
    "content": {"application/json": {"example": {"detail": "study 0b6f... not found"}}},
}


def _get_or_404(session: Session, study_id: str, tenant: str | None) -> Study:
    study = studies.get_study(session, study_id=study_id, tenant=tenant)
    if study is None:
        raise HTTPException(status_code=404, detail=f"study {study_id} not found")
    return study


def study_for_job(session: Session, job: JobCreate, tenant: str) -> tuple[Study | None, list[dict[str, Any]]]:
    """The study a new job names (its row locked until the commit, so jobs join it one at a time),
    and 422 entries: an unknown study (or another tenant's), or what of the job does not fit it."""
    if job.study is None:
        return None, []
    study = studies.get_study(session, study_id=job.study, tenant=tenant, lock=True)
    if study is None:
        return None, [{"loc": ["body", "study"], "msg": f"study {job.study} not found", "type": "not_found"}]
    return study, studies.fit_errors(study, job)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=StudyPublic,
    summary="Create a study",
    dependencies=[Depends(require_json)],
    responses={422: {"model": ValidationErrorBody, "description": "The body is invalid (field and reason)."}},
)
def create_study(body: StudyCreate, session: SessionDep, principal: PrincipalDep, response: Response) -> StudyPublic:
    """A study holds the settings its jobs keep learning: name one in a job (`"study": "<id>"`) and
    the job starts from its settings; after each succeeded job the study learns again over every
    task its jobs brought, except every `holdout_every`-th, which is held out and only evaluated."""
    study = studies.create_study(session, body=body, tenant=principal.tenant)
    session.commit()
    response.headers["Location"] = f"/v1/studies/{study.id}"
    return studies.to_public(session, study)


@router.get("", response_model=StudiesPublic, summary="List studies, newest first")
def list_studies(
    session: ReadSessionDep,
    principal: PrincipalDep,
    tenant: TenantQuery = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Studies to skip.")] = 0,
) -> StudiesPublic:
    scope = listing_scope(principal, tenant)
    rows, total = studies.list_studies(session, tenant=scope, limit=limit, offset=offset)
    return StudiesPublic(items=[studies.to_public(session, s) for s in rows], total=total, limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyPublic, summary="A study", responses={404: _NOT_FOUND})
def get_study(study_id: StudyId, session: ReadSessionDep, principal: PrincipalDep) -> StudyPublic:
    return studies.to_public(session, _get_or_404(session, study_id, principal.scope()))


@router.get(
    "/{study_id}/settings",
    response_model=StudySettingsPublic,
    response_model_exclude_none=True,
    summary="The study's current settings and their evaluation on its held-out tasks",
    responses={404: _NOT_FOUND},
)
def get_study_settings(study_id: StudyId, session: ReadSessionDep, principal: PrincipalDep) -> StudySettingsPublic:
    """`lr` and `momentum` (and `param_groups`, `boundaries` for per-layer or scheduled studies) as
    a job's settings give them; `version` 0 with no `evaluation`: no job has updated the study yet,
    and these are its starting values."""
    return studies.settings_public(_get_or_404(session, study_id, principal.scope()))


@router.get(
    "/{study_id}/history",
    response_model=StudyHistoryPublic,
    summary="How the study's settings changed with each job",
    responses={404: _NOT_FOUND},
)
def get_study_history(study_id: StudyId, session: ReadSessionDep, principal: PrincipalDep) -> StudyHistoryPublic:
    return studies.history_public(session, study=_get_or_404(session, study_id, principal.scope()))
