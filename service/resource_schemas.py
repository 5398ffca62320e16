"""The public bodies of uploaded datasets, uploaded models and live workers (v1 API), re-exported by
service.schemas. Plain pydantic and the standard library, like service.schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

DatasetFormat = Literal["safetensors", "npz", "csv", "parquet"]


class DatasetItem(BaseModel):
    """A tensor (safetensors, npz) or a column (csv, parquet: shape ``[rows]``) of a dataset."""

    name: str
    shape: list[int]
    dtype: str
    min: int | float | None = Field(description="Smallest value (None when empty).")
    max: int | float | None = Field(description="Largest value (None when empty).")
    integer: bool = Field(description="Every value is a whole number.")


class DatasetPublic(BaseModel):
    id: str
    tenant: str = Field(description="The tenant of the key that created it.")
    filename: str
    format: DatasetFormat
    sha256: str
    size: int = Field(description="Bytes of the uploaded file.")
    rows: int | None = Field(None, description="Rows of a csv or parquet file; None for tensors.")
    created_at: datetime
    tensors: list[DatasetItem] = Field(default_factory=list, description="safetensors and npz.")
    columns: list[DatasetItem] = Field(default_factory=list, description="csv and parquet.")


class DatasetsPublic(BaseModel):
    items: list[DatasetPublic]
    total: int
    limit: int
    offset: int


class ModelNode(BaseModel):
    """One operator of an exported program, in call order."""

    op: str = Field(
        description="The operator: linear, conv2d, relu, tanh, sigmoid, gelu, max_pool2d, avg_pool2d or flatten."
    )
    output_shape: list[int] | None = Field(description="Its output's shape per example.")
    parameters: list[str] = Field(description="The parameters it uses.")


class ModelParameter(BaseModel):
    name: str
    shape: list[int]
    dtype: str


class ModelPublic(BaseModel):
    """An uploaded ``torch.export`` program, as the reader found it."""

    id: str
    tenant: str = Field(description="The tenant of the key that created it.")
    filename: str
    sha256: str
    size: int = Field(description="Bytes of the uploaded file.")
    created_at: datetime
    input_shape: list[int] = Field(description="One example's shape (the exported batch dimension dropped).")
    output_width: int = Field(description="Outputs per example (classes or regression targets).")
    operators: list[str] = Field(description="The graph's operators in call order.")
    nodes: list[ModelNode]
    parameters: list[ModelParameter] = Field(description="In call order, with the program's own names.")
    parameter_count: int
    default_init: bool = Field(
        description="Every parameter belongs to a linear or conv2d layer, so "
        "init 'default' can re-draw PyTorch's default initialization."
    )


class ModelsPublic(BaseModel):
    items: list[ModelPublic]
    total: int
    limit: int
    offset: int


class WorkerPublic(BaseModel):
    """A worker process, as it registered itself (service/workers.py)."""

    id: str
    host: str
    pid: int
    device: str = Field(description="Where its chunks run, e.g. cpu or cuda:0 (its GPU's name).")
    queues: list[str] = Field(description="The broker queues it takes chunks from.")
    started_at: datetime
    last_seen: datetime = Field(description="Its last heartbeat, by the database's clock.")
    current_job: str | None = Field(description="The job whose chunk it runs now.")
    live: bool = Field(
        description="Seen within GRADTUNE_WORKER_STALE_SECONDS; a worker that died stays "
        "listed, not live, until it is pruned a day later."
    )


class WorkersPublic(BaseModel):
    items: list[WorkerPublic]
    total: int
    live: int = Field(description="How many workers are live (all pages).")
    stale_after_seconds: float = Field(description="A worker not seen for this long is not live.")
    limit: int
    offset: int
