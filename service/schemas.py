"""The public contract: request and response bodies of the v1 API.

These are plain pydantic models. The worker reads the stored job body through
``JobCreate`` too, so this module must import nothing but pydantic, the standard
library and gradtune.spec (standard library only): no FastAPI, no SQLAlchemy, no torch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, model_validator
from pydantic_core import PydanticCustomError

from gradtune.spec import (  # noqa: F401 - re-exported: service.schemas.ACTIVATIONS, STATUSES, ...
    ACTIVATIONS,
    BUILTIN_DATASETS,
    LOSSES,
    STATUSES,
    TERMINAL_STATUSES,
)
from gradtune.spec.hyper import STENCIL_ITERATIONS, default_iterations, default_search

# gradtune.spec's vocabularies, spelled out for type checkers (tests/service/test_validation.py checks they agree).
Activation = Literal["tanh", "relu", "sigmoid", "gelu"]
Loss = Literal["cross_entropy", "mse"]
# gradtune.spec's JobStatus values, spelled out for type checkers (tests/service checks they agree).
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
BuiltinName = Literal["digits", "breast_cancer", "wine", "iris", "diabetes"]
# gradtune.spec.JOB_DEVICES, spelled out for type checkers (tests/service/test_devices.py checks they agree).
Device = Literal["auto", "cpu", "cuda"]

# JSON has no NaN or Infinity, but Python's parser accepts them: refuse them here.
Finite = Annotated[float, Field(allow_inf_nan=False)]


# No C0 control character (NUL included: PostgreSQL cannot store it in text) nor DEL in names and ids.
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*$"


def no_control_characters(value: str) -> str:
    """Refuse a string holding a control character (U+0000-U+001F, U+007F), naming the first one."""
    for ch in value:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise PydanticCustomError(
                "control_character",
                "control characters are not allowed (found U+{code}); names and ids are printable text",
                {"code": f"{ord(ch):04X}"},
            )
    return value


# Free text and ids: the check above, and the same rule in the OpenAPI schema (as a pattern).
Text = Annotated[str, AfterValidator(no_control_characters), Field(json_schema_extra={"pattern": NO_CONTROL_PATTERN})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _feature_rank(v: Any) -> str:
    """ "images" when the first example is itself a nested list (N, C, H, W), else "table"."""
    if isinstance(v, list) and v and isinstance(v[0], list) and v[0] and isinstance(v[0][0], list):
        return "images"
    return "table"


# x: rows of features (N, F) for an mlp, or images (N, C, H, W) for a cnn. The tag ("table",
# "images") is dropped from error locations (service/api/errors.py).
Features = Annotated[
    Annotated[list[list[Finite]], Tag("table")] | Annotated[list[list[list[list[Finite]]]], Tag("images")],
    Discriminator(_feature_rank),
    Field(min_length=1),
]


class InlineData(_Strict):
    """Arrays in the request body: rows of features (or images (N, C, H, W) for a cnn) and one
    target per row."""

    source: Literal["inline"]
    x_train: Features
    y_train: list[Finite] | list[list[Finite]] = Field(min_length=1)
    x_val: Features
    y_val: list[Finite] | list[list[Finite]] = Field(min_length=1)


class BuiltinData(_Strict):
    """A scikit-learn dataset that ships offline, split by ``val_fraction`` and ``seed``."""

    source: Literal["builtin"]
    name: BuiltinName
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)


Name = Annotated[Text, Field(min_length=1, max_length=255)]


class DatasetRef(_Strict):
    """Features and targets in an uploaded dataset (``POST /v1/datasets``).

    ``x``: the name of one 2-D tensor ``(N, F)`` (safetensors, npz; 4-D ``(N, C, H, W)`` for a
    cnn), or column names (csv,
    parquet: a list of names, or one name for a single feature), read as ``(N, len(x))``.
    ``y``: the name of one tensor or column of N targets (``(N,)``, or ``(N, K)`` for mse).
    """

    dataset: Text = Field(min_length=1, max_length=64, description="A dataset id.")
    x: Annotated[
        Annotated[Name, Tag("name")] | Annotated[list[Name], Field(min_length=1, max_length=4096), Tag("names")],
        Discriminator(lambda v: "names" if isinstance(v, list) else "name"),
    ]
    y: Name


class DatasetData(_Strict):
    """Data from uploaded datasets: ``train``, and either ``val`` (another reference, possibly
    to the same dataset) or a split of ``train`` by ``val_fraction`` and ``seed`` (0.2 and 0
    when neither ``val`` nor they are given), split exactly like a builtin dataset."""

    source: Literal["dataset"]
    train: DatasetRef
    val: DatasetRef | None = None
    val_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _one_way_to_validate(self) -> DatasetData:
        if self.val is None:
            if self.val_fraction is None:
                self.val_fraction = 0.2
            if self.seed is None:
                self.seed = 0
        elif self.val_fraction is not None or self.seed is not None:
            raise ValueError(
                "give either val (a dataset reference) or val_fraction and seed (a split of train), not both"
            )
        return self

    def references(self) -> list[tuple[str, DatasetRef]]:
        """``[("train", ref), ("val", ref)?]``."""
        refs = [("train", self.train)]
        if self.val is not None:
            refs.append(("val", self.val))
        return refs


TaskData = Annotated[InlineData | BuiltinData | DatasetData, Field(discriminator="source")]


class MLPModel(_Strict):
    """``nn.Sequential(Linear, act, ..., Linear)``; ``hidden: []`` is a linear model."""

    kind: Literal["mlp"]
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=list, max_length=16)
    activation: Activation = "tanh"


Size = Annotated[int, Field(ge=1, le=4096)]


class Conv2dLayer(_Strict):
    """``nn.Conv2d(in, out_channels, kernel_size, stride, padding)`` (square kernel, with bias)."""

    type: Literal["conv2d"]
    out_channels: Size
    kernel_size: Annotated[int, Field(ge=1, le=64)]
    stride: Annotated[int, Field(ge=1, le=64)] = 1
    padding: Annotated[int, Field(ge=0, le=64)] = 0


class ActivationLayer(_Strict):
    type: Literal["relu", "tanh"]


class PoolLayer(_Strict):
    """``nn.MaxPool2d`` / ``nn.AvgPool2d(kernel_size, stride)``; stride defaults to kernel_size."""

    type: Literal["maxpool", "avgpool"]
    kernel_size: Annotated[int, Field(ge=1, le=64)]
    stride: Annotated[int, Field(ge=1, le=64)] | None = None


class FlattenLayer(_Strict):
    type: Literal["flatten"]


class LinearLayer(_Strict):
    """``nn.Linear(in, out_features)``; the input width comes from the layers before. The last
    layer's out_features may be left out: it is then the number of classes (cross_entropy) or the
    target width (mse); when given it must equal that."""

    type: Literal["linear"]
    out_features: Annotated[int, Field(ge=1, le=65536)] | None = None


CNNLayer = Annotated[
    Conv2dLayer | ActivationLayer | PoolLayer | FlattenLayer | LinearLayer, Field(discriminator="type")
]


class CNNModel(_Strict):
    """A stack of layers -> ``nn.Sequential`` in that order, for images (N, C, H, W): conv2d,
    relu/tanh, maxpool/avgpool, then flatten, then linear (and activations), ending with linear.
    Parameters are named by position like an mlp's: ``"0.weight", "0.bias", "4.weight", ...``."""

    kind: Literal["cnn"]
    layers: list[CNNLayer] = Field(min_length=1, max_length=64)


class ExportedModelRef(_Strict):
    """An uploaded ``torch.export`` program (``POST /v1/models``), trained through its own graph.

    ``init``: ``"default"`` (like mlp and cnn) starts every draw from fresh PyTorch-default values,
    drawn layer by layer in the order the program calls its linear/conv2d layers (weight with
    ``kaiming_uniform_(a=sqrt(5))``, then bias), so a program exported from a model declared the
    same way as an mlp or cnn trains exactly like that mlp or cnn; ``"uploaded"`` starts every draw
    from the weights in the file. Parameters keep the program's own names (``"0.weight"``...)."""

    kind: Literal["exported"]
    model: Text = Field(min_length=1, max_length=64, description="A model id.")
    init: Literal["default", "uploaded"] = "default"


Model = Annotated[MLPModel | CNNModel | ExportedModelRef, Field(discriminator="kind")]


class TaskSpec(_Strict):
    name: Text | None = Field(None, max_length=200)
    data: TaskData
    model: Model
    loss: Loss
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)


class Hyperparameters(_Strict):
    """Starting values, and the bounds the learned values never leave."""

    lr: Finite = Field(0.01, gt=0.0)
    momentum: Finite = Field(0.9, ge=0.0, lt=1.0)
    lr_bounds: tuple[Finite, Finite] = (1e-5, 10.0)
    momentum_bounds: tuple[Finite, Finite] = (0.0, 0.999)
    per_layer: bool = Field(
        False, description="One lr and one momentum per layer with parameters (weight and bias together)."
    )
    schedule_segments: int = Field(
        1,
        ge=1,
        le=64,
        description="Values shared over this many equal blocks of the step budget (a piecewise-constant "
        "schedule); needs every task to train for the same number of steps.",
    )


Method = Literal["auto", "reverse", "forward", "truncated"]


class MetaOptions(_Strict):
    iterations: int = Field(
        STENCIL_ITERATIONS,
        ge=1,
        description="Meta-iterations. Default: 40 with the stencil search (half of them for the constant "
        "pair when there are richer values); 5 with the line search, 13 with per-layer or scheduled "
        "values (5 for the constant pair, then 8).",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    method: Method = Field(
        "auto",
        description="How hypergradients are taken: reverse (exact, memory grows with steps), forward "
        "(exact, memory independent of steps, compute grows with the number of hyperparameters), "
        "truncated (reverse through the last `truncation` steps: cheap and biased), or auto (picks by "
        "an estimate of memory; the job records which and why).",
    )
    truncation: int = Field(20, ge=1, description="Window (steps) of the truncated method.")
    search: Literal["stencil", "line"] = Field(
        "stencil",
        description="How the values are refined: stencil (the default for a constant pair: a 36-point start, "
        "then each iteration screens the hypergradient move with the 8 neighbouring points) or line (the "
        "default with per_layer or schedule_segments: a 5-point start, then each iteration line-searches "
        "along the hypergradient, all values at once; 5-10x less time, a little less often within 0.03 "
        "of the best pair on the quality benchmark, docs/benchmarks.md).",
    )
    max_seconds: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Deadline: seconds of worker time the job may spend (summed over its chunks, "
        "the data loading included). At the deadline the search stops between two evaluations and "
        'the job succeeds with the best point so far, saying `stopped: "deadline"`; the final '
        "evaluation runs after it. Default and ceiling: the server's GRADTUNE_DEFAULT_JOB_SECONDS and "
        "GRADTUNE_MAX_JOB_SECONDS.",
    )


def _truthy(v: Any) -> bool:
    """per_layer as pydantic reads it (lax mode: "false", "0", "no" are false)."""
    return v is True or (isinstance(v, str) and v.strip().lower() in ("true", "1", "yes", "on", "t", "y")) or v == 1


def _segments(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 1  # invalid: the field validation refuses it


def _with_default_search(data: Any) -> Any:
    """A job body with meta.search and meta.iterations, when not given, following its richer values
    (default_search, default_iterations)."""
    if not isinstance(data, dict) or data.get("meta", {}) is None:
        return data  # not an object, or "meta": null: the field validation says what is wrong
    meta, hp = data.get("meta"), data.get("hyperparameters")
    rich = isinstance(hp, dict) and (_truthy(hp.get("per_layer")) or _segments(hp.get("schedule_segments")) > 1)
    if meta is None or (isinstance(meta, dict) and "iterations" not in meta):
        search = meta.get("search", default_search(rich)) if isinstance(meta, dict) else default_search(rich)
        data = {**data, "meta": {**(meta or {}), "iterations": default_iterations(str(search), rich)}}
    meta = data.get("meta")
    if isinstance(meta, dict) and "search" not in meta:
        data = {**data, "meta": {**meta, "search": default_search(rich)}}
    return data


class JobCreate(_Strict):
    name: Text = Field("job", min_length=1, max_length=200)
    tasks: list[TaskSpec] = Field(min_length=1)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    meta: MetaOptions = Field(default_factory=MetaOptions)
    device: Device = Field(
        "auto",
        description="Where its chunks run: `cpu` or `cuda` workers only, or `auto` (whichever live worker is "
        "free first; a job may change device between chunks). A `cuda` job waits, saying so in `waiting`, "
        "while no GPU worker is live.",
    )
    study: Text | None = Field(
        None,
        max_length=64,
        description="A study id (POST /v1/studies): the job starts from the study's settings and its "
        "tasks join the study's pool.",
    )

    # which of meta.search and meta.iterations the body gave (the others were defaulted from its own
    # hyperparameters): a study's job recomputes the missing ones from the study's (service/studies.py
    # prepare_spec). Not part of the body; set when validating a body (a dict), not a JobCreate.
    _meta_given: frozenset[str] = PrivateAttr(default=frozenset({"search", "iterations"}))

    @property
    def meta_given(self) -> frozenset[str]:
        return self._meta_given

    @model_validator(mode="wrap")
    @classmethod
    def _default_iterations(cls, data: Any, handler: Any) -> Any:
        """meta.search and meta.iterations, when not given, follow the richer values
        (_with_default_search); meta_given says which the body gave."""
        job = handler(_with_default_search(data))
        if isinstance(data, dict):
            meta = data.get("meta")
            job._meta_given = frozenset({"search", "iterations"} & set(meta if isinstance(meta, dict) else ()))
        return job

    def model_ids(self) -> list[str]:
        """The ids of the uploaded models the job's tasks name, each once, in order."""
        ids: list[str] = []
        for task in self.tasks:
            if isinstance(task.model, ExportedModelRef) and task.model.model not in ids:
                ids.append(task.model.model)
        return ids

    def dataset_ids(self) -> list[str]:
        """The ids of the uploaded datasets the job's tasks name, each once, in order."""
        ids: list[str] = []
        for task in self.tasks:
            if isinstance(task.data, DatasetData):
                for _split, ref in task.data.references():
                    if ref.dataset not in ids:
                        ids.append(ref.dataset)
        return ids


class Progress(BaseModel):
    iteration: int
    iterations: int
    meta_loss: float | None = None
    lr: float | None = None
    momentum: float | None = None


# Why a search ended before its iterations: the deadline (meta.max_seconds) passed.
StopReason = Literal["deadline"]


class JobPublic(BaseModel):
    id: str
    tenant: str = Field(description="The tenant of the key that created it.")
    name: str
    status: Status
    progress: Progress
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    cancel_requested: bool = Field(
        False,
        description="A cancel was requested (shown at once): a running job stops within one heartbeat, "
        "between two evaluations, and ends `cancelled`.",
    )
    stopped: StopReason | None = Field(
        None, description="The search ended before its iterations: `deadline` (meta.max_seconds passed)."
    )
    max_seconds: float | None = Field(None, description="The job's deadline in seconds of worker time.")
    elapsed_seconds: float = Field(0.0, description="Worker time spent so far (committed chunks).")
    device: Device = Field("auto", description="The device the job asked for (its `device`).")
    study: str | None = Field(None, description="The study the job joined (its `study`), or null.")
    waiting: str | None = Field(
        None,
        description="Set while the job has not ended and no live worker takes its device's queue, e.g. "
        '"waiting for a GPU worker: ..." for a `cuda` job with no GPU worker; it runs once one starts.',
    )


class JobsPublic(BaseModel):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int


class IterationPublic(BaseModel):
    iteration: int
    meta_loss: float | None
    lr: float
    momentum: float
    accepted: bool
    step_size: float | None = None


class HistoryPublic(BaseModel):
    job_id: str
    items: list[IterationPublic]


class TaskEvaluation(BaseModel):
    name: str
    initial_val_loss: float | None
    learned_val_loss: float | None
    learned_groups_val_loss: float | None = None
    seed: int | None = Field(
        None, description="The task's base seed: initialization and batch order of draw d derive from (seed, d)."
    )


class ParamGroup(BaseModel):
    """A torch.optim param group: parameter names as ``named_parameters()`` gives them, and one lr
    and one momentum per schedule segment."""

    params: list[str]
    lr: list[float]
    momentum: list[float]


class LearnedValues(BaseModel):
    """The values the search found, whether or not they were returned (see ``fallback``)."""

    lr: float
    momentum: float
    param_groups: list[ParamGroup] | None = None
    boundaries: list[int] | None = None


class RichCheck(BaseModel):
    """The per-layer / scheduled values judged on tasks the search never saw (every 4th task, in jobs
    of 16 tasks or more): kept only if their meta-loss there is lower than the constant pair's; a
    table that passes is then refined over every task."""

    held_back: list[int] = Field(
        description="Indices into evaluation.tasks of the tasks held back from the richer search (in a "
        "study's job, evaluation.tasks lists the tasks it trained on: the study's held-out ones are not there)."
    )
    table_loss: float | None
    constant_loss: float | None
    kept: Literal["table", "constant"]
    reason: str | None = None


class Evaluation(BaseModel):
    """Validation loss after each task's steps, trained with plain torch.optim.SGD.

    ``initial_val_loss`` uses the starting values (``initial``), ``learned_val_loss`` the constant
    (lr, momentum) the search found (``learned``); with per-layer or scheduled settings,
    ``learned_groups_val_loss`` uses the ``param_groups`` and ``boundaries`` it found. All are kept
    when the settings fall back to the start or to the constant pair (``fallback``).
    """

    tasks: list[TaskEvaluation]
    mean_initial_val_loss: float | None
    mean_learned_val_loss: float | None
    mean_learned_groups_val_loss: float | None = None
    initial: dict[str, float]
    learned: LearnedValues | None = Field(
        None, description="The values the search found (the top-level values unless `fallback` is set)."
    )
    draws: list[int]
    training_draws: list[int] | None = Field(
        None, description="The draws the meta-objective trained on (disjoint from `draws`)."
    )
    rich_check: RichCheck | None = Field(
        None, description="The richer values' check on held-back tasks; 'constant' sets fallback to constant."
    )


class SettingsPublic(BaseModel):
    """Learned settings. ``lr`` and ``momentum`` are the best constant pair, ready for
    ``torch.optim.SGD(params, lr=..., momentum=...)``. With ``per_layer`` or ``schedule_segments``
    there are also ``param_groups`` (per segment values) and ``boundaries`` (the step where each
    segment starts); apply them with ``gradtune.schedule`` (see the README's recipe).

    Never worse than the start on the evaluation draws: when the learned values evaluate worse
    (a higher mean validation loss) than the starting values, ``lr`` and ``momentum`` are the
    starting values and ``fallback`` is "start"; when per-layer or scheduled values evaluate worse
    than the learned constant pair (which is not worse than the start), ``param_groups`` and
    ``boundaries`` are left out and ``fallback`` is "constant". ``evaluation`` keeps every
    evaluation and ``evaluation.learned`` the values the search found."""

    optimizer: Literal["SGD"] = "SGD"
    lr: float
    momentum: float
    param_groups: list[ParamGroup] | None = None
    boundaries: list[int] | None = None
    method: str | None = Field(None, description="The hypergradient method the job used.")
    method_reason: str | None = Field(None, description="Why auto chose it.")
    search: str | None = Field(None, description="How the values were searched: stencil or line (meta.search).")
    stopped: StopReason | None = Field(
        None,
        description="The search ended early: `deadline` (meta.max_seconds passed); the values are the best "
        "point found by then.",
    )
    fallback: Literal["start", "constant"] | None = Field(
        None,
        description="null: the learned values are returned. 'start': they evaluated worse than the starting "
        "values, which are returned instead. 'constant': the per-layer / scheduled values evaluated worse than "
        "the learned constant pair, or did not beat it on the tasks held back from their search "
        "(evaluation.rich_check), and the pair is returned without param_groups. evaluation keeps every evaluation.",
    )
    evaluation: Evaluation


# The bodies of datasets, models and workers live in service/resource_schemas.py (this module's size);
# imported here so that service.schemas stays the one place to import the public contract from.
from service.resource_schemas import (  # noqa: E402, F401
    DatasetFormat,
    DatasetItem,
    DatasetPublic,
    DatasetsPublic,
    ModelNode,
    ModelParameter,
    ModelPublic,
    ModelsPublic,
    WorkerPublic,
    WorkersPublic,
)
