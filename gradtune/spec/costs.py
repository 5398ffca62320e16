"""The cost model: bytes and FLOPs of a job, written once for the API (admission) and the engine
(method choice, worker/engine/plan.py). Standard library only; docs/cost_model.md has the formulas
and the measurements the constants come from (benchmarks/cost_model.py).

What the engine runs (worker/engine/meta/, functional.py, modules.py), and what is counted:

* An **evaluation** trains every (task, draw) source for its steps at one or more candidate
  settings and takes the validation loss. Candidates x sources run *batched*, as one unroll: on the
  ``mlp`` path (every task an mlp: functional.Objective) the sources of tasks with equal shapes form
  one group; on the ``module`` path (any cnn or exported task: modules.ModuleObjective) so do the
  sources of tasks whose models are the same chain of known functions on data of the same shapes
  (worker/engine/module_unroll.py; TaskCost.group), and any other task is a group of its draws. A
  group runs at most ``max_runs`` runs at once (512 on the mlp path, 128 on the module path):
  ``max(1, max_runs // sources)`` candidates per unroll. Groups run one after the other, so an
  evaluation's working memory is that of its largest unroll.
* **screen**: a forward evaluation without a graph (the start population, the stencil, the line,
  the richer moves, the stability probes). Per run it holds the parameters, momentum buffers,
  gradients and their replacements, one step's activations for the batch, or the validation
  forward pass at the end.
* **reverse**: one candidate (the sources batched) with the graph of every step kept for the
  backward pass: per step and run, parameters and buffers and the activations of the batch.
  **truncated** keeps the graph of the last ``truncation`` steps only. **forward** keeps no graph but
  carries one tangent per hyperparameter H next to every tensor: (1 + H) times a screen's memory.
* The job's **data**: the tasks' tensors, and what the objective prepares once per run_meta call
  (the mlp path's copy of every task's rows with one-hot targets, every source's initial weights,
  and the row indices of every step of every source, 8 bytes per row of a batch; building them
  briefly holds the indices twice).

The peak is the data plus the largest working memory of any part of the job (start, refine,
hypergradient, richer phase, evaluation). FLOPs: 2 per multiply-add; a training step is forward
(2 MACs), backward (4 MACs) per example and an update of the parameters; reverse costs about three
unrolls (the backward pass through a training step is twice its forward), forward mode 1 + 2H (each
tangent doubles the matrix products), truncated 1 + 2 W / T.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

METHODS: tuple[str, ...] = ("reverse", "forward", "truncated")
SEARCHES: tuple[str, ...] = ("stencil", "line")
PATHS: tuple[str, ...] = ("mlp", "module")
INDEX_BYTES = 8  # int64 row indices
SLACK_BYTES = 16 * 1024**2  # allocator slack and small tensors: measured 4-10 MB above the terms below
# A whole meta-loop holds more than one evaluation does: the allocator keeps freed blocks between
# screening sub-batches, the state, records and the objective's prepared groups. Measured
# (benchmarks/memory_budget.py): 60-100 MB above the largest evaluation on digits-size jobs.
LOOP_SLACK_BYTES = 112 * 1024**2
MAX_RUNS = {"mlp": 512, "module": 128}  # functional.Objective / modules.ModuleObjective max_runs

# ---------------------------------------------------------------------------- calibrated constants
# Elements held per run (times the element size) by path: P = parameters, A = activations per
# example (shapes.ModelShapes.activations), B = batch size, V = validation rows, H = hyperparameters
# of a forward-mode hypergradient. Each is a slope measured with benchmarks/cost_model.py (the
# table in docs/cost_model.md), rounded up so that the model bounds every measured case from above.
#   screen R runs of K candidates:  R s_P P + max(R s_A B A, R_val s_V V A)
#   reverse R runs:                 R (steps kept x (r_P P + r_A B A) + r_V V A + s_P P + s_A B A)
#   forward R runs:                 R (f_P0 + H f_P1) P + max(R (f_A0 + H f_A1) B A, R_val (f_V0 + H f_V1) V A)
# R_val: the runs validated at once: the mlp path validates one source at a time (K runs of a
# screen, 1 of forward mode), the module path every run at once. The slopes, measured twice
# (benchmarks/cost_model.py --slopes; they move by up to 20 % between runs, P-heavy forward runs
# more): mlp screen 5.0 P, 2.5 BA, 1.0 VA; reverse per step 2.9-3.0 P, 1.6-1.8 BA, and 1.1 VA;
# forward 25-29 P, 10.7-11.3 BA at H = 2, 13.5-15 P, 5.8-6.8 BA per further tangent. cnn screen
# 4.9 P, 1.2-1.5 BA, 1.05 VA; reverse per step 2.9-3.1 P, 1.5 BA, and 1.3-1.4 VA; forward 30-39 P,
# 10-11 BA at H = 2, 13.3 P, 4.2 BA, 0.84 VA per further tangent. Since cnn and exported groups run
# without vmap (module_unroll), a cnn reverse step measures 1.2 BA (the vmap path, still taken by any
# other model, 1.5): the module reverse A slope is 1.7 (2.0 before), which bounds both and keeps the
# cnn case within 2x of its measured peak (tests/gradtune/spec/test_costs_measured.py).
SCREEN = {"mlp": {"P": 6.0, "A": 3.0, "V": 1.25}, "module": {"P": 6.0, "A": 2.0, "V": 1.3}}
REVERSE = {"mlp": {"P": 3.5, "A": 2.0, "V": 1.4}, "module": {"P": 3.5, "A": 1.7, "V": 1.6}}
FORWARD = {
    "mlp": {"P": (5.0, 14.0), "A": (3.0, 6.5), "V": (1.5, 1.5)},
    "module": {"P": (14.0, 15.0), "A": (3.0, 4.5), "V": (1.5, 1.0)},
}
# the reference trainer (torch.optim.SGD on one nn.Module: the final evaluation), one run
EVALUATION = {"P": 4.0, "A": 3.0, "V": 2.0}


@dataclass(frozen=True)
class TaskCost:
    """One task, as the cost model sees it (plain numbers: the API reads them off the job body, the
    engine off its tensors).

    params: trainable parameters; activations: elements one example leaves in a forward pass (the
    input and every layer's output, shapes.ModelShapes.activations); macs: multiply-adds of one
    example's forward pass; in_elements: one example's input elements; out_features: the model's
    outputs (one-hot width of cross_entropy targets). group: tasks of one kind with equal group
    keys (equal shapes, steps and batch) share one batched unroll; None: a group of its own.
    kind: "mlp" (the engine's hand-written batched path) or "module" (cnn, exported)."""

    params: int
    activations: int
    macs: int
    batch_size: int
    steps: int
    n_train: int
    n_val: int
    in_elements: int
    out_features: int
    element_size: int = 4
    kind: str = "mlp"
    group: Hashable | None = None


@dataclass(frozen=True)
class MetaCost:
    """The meta-loop's settings that decide what runs batched and how often (MetaConfig's names).

    method: "reverse", "forward", "truncated", or "auto" (resolve_method with memory_budget_bytes:
    reverse if its hypergradient fits, else forward if it fits, else truncated).
    population: candidates of the start (up to (1 + momenta) x (2 span + 1): 45 by default; 0 with
    the population off); stencil: candidates of a stencil refine (the hypergradient move and 8
    neighbours; 5 without diagonals); line_steps: candidates of a line search; slots and segments:
    the richer table (slots: layers with parameters when per_layer, else 1)."""

    iterations: int = 40
    method: str = "auto"
    search: str = "stencil"
    draws: int = 2
    eval_draws: int = 3
    truncation: int = 20
    population: int = 45
    stencil: int = 9
    line_steps: int = 4
    slots: int = 1
    segments: int = 1
    rich_random_directions: int = 8
    constant_fraction: float = 0.5
    memory_budget_bytes: float = 2 * 1024**3
    # the whole job's memory budget (GRADTUNE_MAX_JOB_MEMORY_BYTES; MetaConfig.job_memory_mb): a
    # screen batches no more candidates per unroll than fit in it beside the data (screen_candidates);
    # None: no cap (max_runs only)
    job_memory_bytes: float | None = None

    @property
    def rich(self) -> bool:
        return self.slots > 1 or self.segments > 1

    @property
    def hyperparameters(self) -> int:
        """What one hypergradient differentiates: the constant pair, or the richer table."""
        return 2 * self.slots * self.segments if self.rich else 2


@dataclass(frozen=True)
class Part:
    """One kind of evaluation in a job: ``count`` of them, the largest batched unroll (``runs``
    runs, ``candidates`` candidates), its working memory in bytes, and the FLOPs of all of them."""

    name: str
    mode: str  # screen | reverse | forward | truncated | evaluation
    count: int
    candidates: int
    runs: int
    bytes: int
    flops: float


@dataclass(frozen=True)
class CostEstimate:
    """A job's peak memory (data + the largest working memory of any part) and total FLOPs."""

    peak_bytes: int
    flops: float
    data_bytes: int  # the tasks' tensors and the objective's prepared copies and indices
    task_bytes: int  # of which the tasks' own tensors
    build_bytes: int  # held only while the objective is built (the indices stacked)
    method: str
    hyperparameters: int
    steps: int
    path: str
    parts: tuple[Part, ...] = field(default_factory=tuple)

    @property
    def peak_part(self) -> Part:
        return max(self.parts, key=lambda p: p.bytes)

    def part(self, name: str) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)


# ---------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class _Group:
    task: TaskCost  # the shapes every source of the group shares
    sources: int


def path_of(tasks: Sequence[TaskCost]) -> str:
    """The engine batches mlps by hand only when every task is one; otherwise every task (mlps too)
    goes through the module path."""
    return "mlp" if all(t.kind == "mlp" for t in tasks) else "module"


def _groups(tasks: Sequence[TaskCost], draws: int) -> list[_Group]:
    counts: dict[Hashable, list] = {}
    for i, t in enumerate(tasks):
        key = ("task", i) if t.group is None else ("group", t.kind, t.group)
        counts.setdefault(key, [t, 0])[1] += draws
    return [_Group(t, n) for t, n in counts.values()]


def candidates_per_unroll(sources: int, candidates: int, path: str, cap: int | None = None) -> int:
    """Candidates one unroll batches: the engine chunks them by max_runs // sources, and by
    ``cap`` (screen_candidates: what fits the job's memory budget) when there is one."""
    k = max(1, min(candidates, MAX_RUNS[path] // max(1, sources)))
    return k if cap is None else max(1, min(k, cap))


def unroll_budget(tasks: Sequence[TaskCost], meta: MetaCost) -> float | None:
    """Bytes one screen unroll may hold: the job's memory budget less the data and the allocator's
    slack (None: no budget)."""
    if meta.job_memory_bytes is None:
        return None
    own, prepared, _build = data_bytes(tasks, meta)
    return float(meta.job_memory_bytes) - own - prepared - SLACK_BYTES - LOOP_SLACK_BYTES


def screen_candidates(t: TaskCost, path: str, sources: int, budget: float | None) -> int | None:
    """The most candidates (times ``sources`` runs) a screen unroll of task ``t`` batches within
    ``budget`` bytes, at least 1 (one candidate over the group's sources is never split); None
    without a budget. The engine sub-batches a screen by it (worker/engine/plan.screen_cap)."""
    if budget is None:
        return None
    top = max(1, MAX_RUNS[path] // max(1, sources))
    lo, hi = 1, top
    while lo < hi:  # unroll_bytes grows with the candidates
        mid = (lo + hi + 1) // 2
        if unroll_bytes(t, "screen", path, mid * sources, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ---------------------------------------------------------------------------- one unroll


def _val_runs(path: str, runs: int, candidates: int, mode: str) -> int:
    """Runs whose validation pass is held at once (functional.Objective validates one source at a
    time, so a screen holds its candidates' and forward mode one run's; reverse keeps every run's)."""
    if path == "module" or mode in ("reverse", "truncated"):
        return runs
    return candidates if mode == "screen" else 1


def _screen_elements(t: TaskCost, path: str, runs: int, candidates: int) -> float:
    c = SCREEN[path]
    val = _val_runs(path, runs, candidates, "screen") * c["V"] * t.n_val * t.activations
    return runs * c["P"] * t.params + max(runs * c["A"] * t.batch_size * t.activations, val)


def _forward_elements(t: TaskCost, path: str, runs: int, hyper: int) -> float:
    c = FORWARD[path]

    def per(key: str) -> float:
        return c[key][0] + hyper * c[key][1]

    val = _val_runs(path, runs, 1, "forward") * per("V") * t.n_val * t.activations
    return runs * per("P") * t.params + max(runs * per("A") * t.batch_size * t.activations, val)


def unroll_bytes(
    t: TaskCost, mode: str, path: str, runs: int = 1, candidates: int = 1, hyper: int = 2, truncation: int = 20
) -> int:
    """Working memory of one unroll of ``runs`` runs of task ``t`` (``candidates`` settings times
    its group's sources) in ``mode``: screen, reverse, truncated, forward; evaluation is the
    reference trainer's single run."""
    e = t.element_size
    if mode == "screen":
        return int(e * _screen_elements(t, path, runs, candidates))
    if mode == "forward":
        return int(e * _forward_elements(t, path, runs, hyper))
    if mode == "evaluation":
        c = EVALUATION
        acts = max(c["A"] * t.batch_size, c["V"] * t.n_val) * t.activations
        return int(e * (c["P"] * t.params + acts) + INDEX_BYTES * t.steps * t.batch_size)
    if mode not in ("reverse", "truncated"):
        raise ValueError(f"unknown mode {mode!r}")
    kept = t.steps if mode == "reverse" else min(t.steps, int(truncation))
    c, s = REVERSE[path], SCREEN[path]
    graph = kept * (c["P"] * t.params + c["A"] * t.batch_size * t.activations) + c["V"] * t.n_val * t.activations
    step = s["P"] * t.params + s["A"] * t.batch_size * t.activations  # the validation pass is in the graph
    return int(e * runs * (graph + step))


def run_flops(t: TaskCost, mode: str, hyper: int = 2, truncation: int = 20) -> float:
    """FLOPs of one run: a training unroll (6 MACs per example per step forward and backward, and
    the update) and the validation pass, times the mode's factor."""
    unroll = t.steps * (6.0 * t.macs * t.batch_size + 4.0 * t.params) + 2.0 * t.macs * t.n_val
    if mode in ("screen", "evaluation"):
        return unroll
    if mode == "reverse":
        return 3.0 * unroll
    if mode == "truncated":
        return unroll * (1.0 + 2.0 * min(t.steps, int(truncation)) / t.steps)
    return unroll * (1.0 + 2.0 * hyper)


# ---------------------------------------------------------------------------- one evaluation


def evaluation(
    tasks: Sequence[TaskCost],
    meta: MetaCost,
    mode: str,
    candidates: int = 1,
    name: str = "",
    count: int = 1,
    hyper: int | None = None,
) -> Part:
    """``count`` evaluations of ``candidates`` settings on every (task, draw) source, as the engine
    batches them: the working memory of the largest unroll and the FLOPs of all of them."""
    path = path_of(tasks)
    hyper = meta.hyperparameters if hyper is None else hyper
    budget = unroll_budget(tasks, meta) if mode == "screen" else None
    worst, worst_runs, worst_k, flops = 0.0, 0, 0, 0.0
    for g in _groups(tasks, meta.draws):
        cap = screen_candidates(g.task, path, g.sources, budget)
        k = 1 if mode in METHODS else candidates_per_unroll(g.sources, candidates, path, cap)
        runs = k * g.sources
        size = unroll_bytes(g.task, mode, path, runs, k, hyper, meta.truncation)
        if size > worst:
            worst, worst_runs, worst_k = size, runs, k
        flops += candidates * g.sources * run_flops(g.task, mode, hyper, meta.truncation)
    return Part(name or mode, mode, count, worst_k, worst_runs, int(worst), count * flops)


def evaluation_peak(tasks: Sequence[TaskCost], meta: MetaCost, mode: str, candidates: int = 1) -> int:
    """Bytes one evaluation adds to a process that holds the tasks: the objective's prepared data,
    then the larger of what building it holds briefly and the evaluation's working memory, and the
    allocator's slack (what benchmarks/cost_model.py measures)."""
    _own, prepared, build = data_bytes(tasks, meta)
    return prepared + max(build, evaluation(tasks, meta, mode, candidates).bytes) + SLACK_BYTES


def hypergradient_bytes(tasks: Sequence[TaskCost], meta: MetaCost, method: str) -> int:
    """Working memory of one hypergradient by ``method`` (the richer table's, when it has one)."""
    return evaluation(tasks, meta, method).bytes


def resolve_method(tasks: Sequence[TaskCost], meta: MetaCost) -> str:
    """The engine's method: a requested one as is; auto takes reverse when its hypergradient fits
    meta.memory_budget_bytes, else forward when that fits, else truncated (meta.choose_method)."""
    if meta.method != "auto":
        if meta.method not in METHODS:
            raise ValueError(f"unknown method {meta.method!r}")
        return meta.method
    for method in ("reverse", "forward"):
        if hypergradient_bytes(tasks, meta, method) <= meta.memory_budget_bytes:
            return method
    return "truncated"


# ---------------------------------------------------------------------------- data


def data_bytes(tasks: Sequence[TaskCost], meta: MetaCost) -> tuple[int, int, int]:
    """(the tasks' tensors, what the objective prepares and keeps, what building it holds briefly)."""
    path = path_of(tasks)
    own = prepared = build = 0
    for t in tasks:
        own += t.element_size * (t.n_train + t.n_val) * t.in_elements + INDEX_BYTES * (t.n_train + t.n_val)
    for g in _groups(tasks, meta.draws):
        t = g.task
        indices = INDEX_BYTES * g.sources * t.steps * t.batch_size
        weights = t.element_size * g.sources * t.params
        prepared += indices + weights
        # stacking copies the per-source indices and weights; each source's batch order is built
        # from its epochs' permutations, concatenated and offset, and the heap may keep as much
        # again in freed blocks (measured: up to 3x the indices at the peak of the build)
        build = max(build, 2 * indices + weights)
    if path == "mlp":
        for t in tasks:  # every task's rows, with one-hot targets (built from int64)
            prepared += t.element_size * t.n_train * (t.in_elements + t.out_features)
            build = max(build, INDEX_BYTES * t.n_train * t.out_features)
    return int(own), int(prepared), int(build)


# ---------------------------------------------------------------------------- the job


def _constant_parts(tasks: Sequence[TaskCost], meta: MetaCost, method: str, iterations: int) -> list[Part]:
    parts = []
    if meta.population > 0:
        parts.append(evaluation(tasks, meta, "screen", meta.population, "start"))
    parts.append(evaluation(tasks, meta, method, 1, "hypergradient", count=iterations, hyper=2))
    refine = meta.line_steps if meta.search == "line" else meta.stencil
    if iterations > 1:
        # a line search that finds nothing hands the next iteration to the stencil
        widest = max(refine, meta.stencil)
        worst = evaluation(tasks, meta, "screen", widest, "refine", count=iterations - 1)
        typical = evaluation(tasks, meta, "screen", refine, count=iterations - 1)
        parts.append(Part("refine", "screen", iterations - 1, worst.candidates, worst.runs, worst.bytes, typical.flops))
    return parts


def _rich_parts(tasks: Sequence[TaskCost], meta: MetaCost, method: str, iterations: int) -> list[Part]:
    if iterations < 1:
        return []
    h = meta.hyperparameters
    moves = 1 + 2 * h + meta.rich_random_directions
    refine = meta.line_steps if meta.search == "line" else moves
    parts = [evaluation(tasks, meta, method, 1, "rich_hypergradient", count=iterations, hyper=h)]
    if iterations > 1:
        worst = evaluation(tasks, meta, "screen", max(refine, moves), "rich_refine", count=iterations - 1)
        typical = evaluation(tasks, meta, "screen", refine + 2, count=iterations - 1)  # and 2 stability probes
        parts.append(
            Part("rich_refine", "screen", iterations - 1, worst.candidates, worst.runs, worst.bytes, typical.flops)
        )
    return parts


def _evaluation_part(tasks: Sequence[TaskCost], meta: MetaCost) -> Part:
    """The final evaluation: plain torch.optim.SGD, one run at a time, on every task and eval draw,
    at the starting and the learned settings (and the richer ones)."""
    times = 3 if meta.rich else 2
    worst = max(unroll_bytes(t, "evaluation", "module") for t in tasks)
    flops = times * meta.eval_draws * sum(run_flops(t, "evaluation") for t in tasks)
    return Part("evaluation", "evaluation", times * meta.eval_draws * len(tasks), 1, 1, int(worst), flops)


def estimate(tasks: Sequence[TaskCost], meta: MetaCost) -> CostEstimate:
    """The whole job: every part's largest batched unroll and FLOPs, the data, the peak."""
    if not tasks:
        raise ValueError("a job needs at least one task")
    method = resolve_method(tasks, meta)
    if meta.rich:
        constant = max(1, int(meta.iterations * meta.constant_fraction))
    else:
        constant = meta.iterations
    constant = min(constant, meta.iterations)
    parts = _constant_parts(tasks, meta, method, constant)
    parts += _rich_parts(tasks, meta, method, meta.iterations - constant)
    parts.append(_evaluation_part(tasks, meta))
    own, prepared, build = data_bytes(tasks, meta)
    working = max(max(p.bytes for p in parts), build)
    return CostEstimate(
        peak_bytes=int(own + prepared + working + SLACK_BYTES + LOOP_SLACK_BYTES),
        flops=sum(p.flops for p in parts),
        data_bytes=own + prepared,
        task_bytes=own,
        build_bytes=build,
        method=method,
        hyperparameters=meta.hyperparameters,
        steps=max(t.steps for t in tasks),
        path=path_of(tasks),
        parts=tuple(parts),
    )


# ---------------------------------------------------------------------------- the engine's defaults

# Candidates of the start population by search: MetaConfig's population (the starting lr times
# 10**(k/2), |k| <= 4, at the starting momentum and 4 more: 9 x 5) and LINE_SEARCH's (10**k,
# |k| <= 2, at the starting momentum: 5). tests/worker/engine/test_plan.py checks them against the engine.
START_CANDIDATES = {"stencil": 45, "line": 5}
DRAWS = 2  # MetaConfig.draws: (0, 1)
EVAL_DRAWS = 3  # reference.EVAL_DRAWS: (1001, 1002, 1003)
