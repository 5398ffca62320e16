"""The public contract of studies (/v1/studies): settings learned across the jobs that name one.

Like service/schemas.py: pydantic, the standard library and gradtune.spec only (the worker reads a
stored study body through ``StudyCreate`` too).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.schemas import Hyperparameters, ParamGroup, Text, _Strict


class StudyMeta(_Strict):
    """How the study learns again after each job (worker/engine/study.py): rounds of a meta-batch of
    pool tasks, each a few warm line-search iterations, kept only if not worse on other pool tasks."""

    meta_batch: int = Field(16, ge=1, le=256, description="Tasks per meta-batch (one unroll).")
    rounds: int = Field(2, ge=1, le=16, description="Meta-batches per update.")
    iterations: int = Field(3, ge=1, le=40, description="Meta-iterations per meta-batch.")
    check_tasks: int = Field(16, ge=1, le=256, description="Other pool tasks each round's answer is checked on.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds the meta-batches drawn.")
    eval_tasks: int = Field(
        64,
        ge=1,
        le=1024,
        description="Held-out tasks each update evaluates the settings on: the first ones by pool position "
        "(the same ones every update, so that the history's held-out losses compare).",
    )


class StudyCreate(_Strict):
    name: Text = Field("study", min_length=1, max_length=200)
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters,
        description="Starting values and bounds, per_layer and schedule_segments: every job of the study uses these.",
    )
    holdout_every: int = Field(
        4, ge=2, le=1000, description="Every k-th task to join the pool is held out: never trained on, only evaluated."
    )
    meta: StudyMeta = Field(default_factory=StudyMeta)


class StudySettings(BaseModel):
    lr: float
    momentum: float
    param_groups: list[ParamGroup] | None = None
    boundaries: list[int] | None = None


class PoolCounts(BaseModel):
    tasks: int = Field(description="Tasks that joined (every job's, in the order they joined).")
    training: int = Field(description="Not held out: what the study learns from.")
    held_out: int = Field(description="Held out: never trained on, only evaluated.")


class StudyPublic(BaseModel):
    id: str
    tenant: str = Field(description="The tenant of the key that created it.")
    name: str
    hyperparameters: Hyperparameters
    holdout_every: int
    meta: StudyMeta
    kind: dict[str, Any] | None = Field(None, description="What every task must share (fixed by the first job).")
    version: int = Field(description="Updates so far (one after each succeeded job).")
    jobs: int = Field(description="Jobs that named the study.")
    pool: PoolCounts
    settings: StudySettings = Field(description="The current settings (the starting values before any update).")
    created_at: datetime
    updated_at: datetime


class StudiesPublic(BaseModel):
    items: list[StudyPublic]
    total: int
    limit: int
    offset: int


class HeldOutTask(BaseModel):
    job_id: str
    task_index: int
    name: str
    val_loss: float | None = Field(description="With the study's settings (mean over the evaluation draws).")
    start_val_loss: float | None = Field(description="With the study's starting values.")


class HeldOutEvaluation(BaseModel):
    """The settings on the study's held-out tasks (plain torch.optim.SGD, the evaluation draws)."""

    tasks: list[HeldOutTask]
    mean_val_loss: float | None
    mean_start_val_loss: float | None
    draws: list[int]
    held_out: int = Field(description="Held-out tasks of the study's succeeded jobs when it was evaluated.")
    evaluated: int = Field(
        description="Held-out tasks evaluated: the first meta.eval_tasks of them by pool position, "
        "less those whose data could not be loaded."
    )


class StudySettingsPublic(StudySettings):
    """The study's current settings, ready for ``torch.optim.SGD`` like a job's, and their
    evaluation on its held-out tasks (None before the first update, or with no held-out task yet)."""

    study_id: str
    version: int
    evaluation: HeldOutEvaluation | None = None


class StudyUpdatePublic(BaseModel):
    version: int
    job_id: str = Field(description="The job after which the study learned again.")
    before: StudySettings
    after: StudySettings
    pool: PoolCounts
    rounds: list[dict[str, Any]] = Field(
        description="Per meta-batch: its tasks (positions), check loss before and after, kept."
    )
    held_out_mean_val_loss: float | None = None
    held_out_evaluated: int | None = Field(
        None, description="Held-out tasks that mean is over (meta.eval_tasks at most); None in older updates."
    )
    unavailable: list[str] = Field(
        [], description="Jobs whose data the update could not load: their tasks were not learned from or evaluated."
    )
    seconds: float | None = None
    note: str | None = Field(None, description="Why the settings were kept without learning, when they were.")
    created_at: datetime | None = None


class StudyHistoryPublic(BaseModel):
    study_id: str
    items: list[StudyUpdatePublic]
