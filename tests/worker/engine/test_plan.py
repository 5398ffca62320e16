"""worker/engine/plan.py: the engine's tasks and MetaConfig as the spec's cost inputs, checked
against the engine itself (its defaults, its batching) and against the API's reading of the same
models (service.validation), so that both sides estimate with the same numbers."""

from __future__ import annotations

import inspect
import math
from datetime import UTC, datetime

import pytest
import torch
from torch import nn

from gradtune.spec import costs
from gradtune.spec.shapes import cnn_shapes, mlp_shapes
from service.exported_files import describe_program, read_pt2, read_weights
from service.schemas import ModelPublic
from service.validation.models import exported_terms
from tests.helpers.tasks import synthetic_task
from worker.engine import functional, plan
from worker.engine.cnn import cnn_task
from worker.engine.exported import exported_task
from worker.engine.functional import Objective
from worker.engine.meta import LINE_SEARCH, MetaConfig, init_state, run_meta
from worker.engine.modules import ModuleObjective
from worker.engine.reference import EVAL_DRAWS

LAYERS = [
    {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
    {"type": "relu"},
    {"type": "maxpool", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "linear", "out_features": 6},
    {"type": "tanh"},
    {"type": "linear"},
]


def images_task(steps=4, batch=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 2, 6, 6, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return cnn_task("c", x[:16], y[:16], x[16:], y[16:], LAYERS, "cross_entropy", 3, steps, batch, 0)


def test_the_spec_defaults_are_the_engines():
    meta = plan.meta_cost(MetaConfig())
    base = costs.MetaCost()
    for name in (
        "iterations",
        "method",
        "search",
        "draws",
        "eval_draws",
        "truncation",
        "population",
        "stencil",
        "line_steps",
        "slots",
        "segments",
        "rich_random_directions",
        "constant_fraction",
    ):
        assert getattr(meta, name) == getattr(base, name), name
    assert meta.population == costs.START_CANDIDATES["stencil"]
    assert plan.meta_cost(MetaConfig(**LINE_SEARCH)).population == costs.START_CANDIDATES["line"]
    assert plan.meta_cost(MetaConfig(population=False)).population == 0
    assert costs.DRAWS == len(MetaConfig().draws) and costs.EVAL_DRAWS == len(EVAL_DRAWS)
    for cls, path in ((Objective, "mlp"), (ModuleObjective, "module")):
        assert inspect.signature(cls.__init__).parameters["max_runs"].default == costs.MAX_RUNS[path]


def test_estimate_has_estimate_costs_keys_from_the_spec_model():
    tasks = [synthetic_task(seed=s, dtype=torch.float32) for s in range(3)]
    out = plan.estimate(tasks, MetaConfig(iterations=5))
    for key in ("hyperparameters", "steps", "reverse_mb", "forward_mb", "truncated_mb"):
        assert key in out
    costs_in, meta = plan.spec_inputs(tasks, MetaConfig(iterations=5))
    assert out["reverse_mb"] * 2**20 == costs.hypergradient_bytes(costs_in, meta, "reverse")
    assert out["steps"] == 12 and out["hyperparameters"] == 2
    assert out["method"] in costs.METHODS and out["peak_mb"] > out["reverse_mb"]
    rich = plan.estimate(tasks, MetaConfig(per_layer=True, schedule_segments=3))
    assert rich["hyperparameters"] == 2 * 2 * 3  # two Linear layers x three segments x (lr, momentum)


def test_mlp_tasks_are_sized_like_the_spec_and_grouped_like_the_objective():
    a = [synthetic_task(seed=s, dtype=torch.float32) for s in range(3)]
    b = [synthetic_task(seed=9, hidden=(5, 4), dtype=torch.float32)]
    cost, slots = plan.task_cost(a[0])
    s = mlp_shapes(5, (8,), 3, "tanh")
    assert (cost.params, cost.activations, cost.macs, slots) == (s.params, s.activations, s.macs, 2)
    assert (cost.n_train, cost.n_val, cost.in_elements, cost.element_size) == (48, 20, 5, 4)
    costs_in, meta = plan.spec_inputs(a + b, MetaConfig())
    assert len({c.group for c in costs_in}) == len(Objective(a + b, (0, 1)).groups) == 2


def test_module_tasks_are_sized_like_the_spec():
    terms = plan.module_terms(images_task())
    s = cnn_shapes(LAYERS, (2, 6, 6), 3)
    assert (terms["params"], terms["activations"], terms["macs"], terms["out_features"], terms["slots"]) == (
        s.params,
        s.activations,
        s.macs,
        3,
        3,
    )


def test_an_exported_program_is_sized_alike_by_the_api_and_the_engine(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(27, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    )
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(4, 2, 6, 6),)), str(path))
    program = read_pt2(path)
    public = ModelPublic(
        id="m",
        tenant="default",
        filename="m.pt2",
        sha256="0" * 64,
        size=1,
        created_at=datetime.now(UTC),
        **{k: v for k, v in describe_program(program).items() if k in ModelPublic.model_fields},
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 2, 6, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    task = exported_task(
        "e", x[:16], y[:16], x[16:], y[16:], program, read_weights(path, program), "cross_entropy", 4, 4, 0
    )
    engine = plan.module_terms(task)
    s = cnn_shapes(LAYERS, (2, 6, 6), 3)
    assert exported_terms(public) == (engine["params"], engine["activations"], engine["macs"])
    assert (engine["params"], engine["activations"], engine["macs"]) == (s.params, s.activations, s.macs)


def test_the_spec_batches_what_the_engine_batches(monkeypatch):
    """Run the meta-loop on 32 tiny tasks (64 sources) and record every unroll the engine makes:
    the start screens its population in chunks of 512 // 64 = 8 candidates, the hypergradient runs
    the 64 sources together, the stencil screens up to 9 candidates; the spec's parts say so."""
    seen: list[tuple[int, bool]] = []
    inner = functional._unroll_group

    def spy(group, lr, momentum, grad_from=0):
        seen.append((lr.shape[0] * group.n_sources, torch.is_grad_enabled()))
        return inner(group, lr, momentum, grad_from)

    monkeypatch.setattr(functional, "_unroll_group", spy)
    tasks = [
        synthetic_task(seed=s, hidden=(2,), steps=2, batch=8, n=16, n_val=4, dtype=torch.float32) for s in range(32)
    ]
    config = MetaConfig(iterations=2, method="reverse")
    run_meta(tasks, config, init_state(config, 0.01, 0.9), 2)
    est = plan.job_estimate(tasks, config)
    screened = [runs for runs, grad in seen if not grad]
    differentiated = [runs for runs, grad in seen if grad]
    assert max(screened) == est.part("start").runs == 8 * 64
    assert set(differentiated) == {est.part("hypergradient").runs} == {64}
    refine = screened[math.ceil(36 / 8) :]  # after the start's 36 candidates (5 unrolls)
    assert refine and max(refine) <= est.part("refine").runs == 8 * 64


@pytest.mark.parametrize("method", ["reverse", "forward", "truncated"])
def test_requested_methods_are_kept(method):
    out = plan.estimate([synthetic_task(dtype=torch.float32)], MetaConfig(method=method))
    assert out["method"] == method


def _budget_for(tasks, config, candidates):
    """A job budget (MB) under which a screen of the tasks' one group batches ``candidates``."""
    costs_in, meta = plan.spec_inputs(tasks, config)
    own, prepared, _ = costs.data_bytes(costs_in, meta)
    sources = len(tasks) * len(config.draws)
    unroll = costs.unroll_bytes(costs_in[0], "screen", "mlp", candidates * sources, candidates)
    return (own + prepared + costs.SLACK_BYTES + costs.LOOP_SLACK_BYTES + unroll + 1) / 2**20


def test_the_spec_batches_what_the_engine_sub_batches_under_a_job_budget(monkeypatch):
    """The same 32-task run with a job memory budget that fits 3 candidates x 64 sources per screen
    unroll: the engine screens in chunks of 3, and the spec's parts (the peak admission checks)
    count those chunks, not 8."""
    seen: list[tuple[int, bool]] = []
    inner = functional._unroll_group

    def spy(group, lr, momentum, grad_from=0):
        seen.append((lr.shape[0] * group.n_sources, torch.is_grad_enabled()))
        return inner(group, lr, momentum, grad_from)

    monkeypatch.setattr(functional, "_unroll_group", spy)
    tasks = [
        synthetic_task(seed=s, hidden=(2,), steps=2, batch=8, n=16, n_val=4, dtype=torch.float32) for s in range(32)
    ]
    probe = MetaConfig(iterations=2, method="reverse")
    config = MetaConfig(iterations=2, method="reverse", job_memory_mb=_budget_for(tasks, probe, 3))
    run_meta(tasks, config, init_state(config, 0.01, 0.9), 2)
    est = plan.job_estimate(tasks, config)
    unbounded = plan.job_estimate(tasks, probe)
    screened = [runs for runs, grad in seen if not grad]
    assert max(screened) == est.part("start").runs == 3 * 64
    assert est.part("start").candidates == 3 and unbounded.part("start").candidates == 8
    assert est.part("start").bytes < unbounded.part("start").bytes
    assert est.peak_bytes <= config.job_memory_mb * 2**20
    assert screened[: math.ceil(36 / 3)] == [3 * 64] * 12  # the start's 36 candidates, 3 at a time
    # one byte less and only 2 fit
    tight = MetaConfig(iterations=2, method="reverse", job_memory_mb=_budget_for(tasks, probe, 3) - 2 / 2**20)
    assert plan.job_estimate(tasks, tight).part("start").candidates == 2


def _screen(objective, k=7):
    lrs = [0.003 * 2.0**i for i in range(k)]
    moms = [0.0, 0.5, 0.9, 0.99, 0.3, 0.7, 0.95][:k]
    return objective.losses(lrs, moms)


def test_sub_batched_screens_give_the_same_losses_to_the_last_bit():
    tasks = [synthetic_task(seed=s) for s in range(3)] + [synthetic_task(seed=7, hidden=(4, 3))]
    whole = _screen(Objective(tasks, (0, 1)))
    assert all(math.isfinite(v) for v in whole[:4])
    for cap in (1, 2, 3):
        split = Objective(tasks, (0, 1), screen_cap=lambda task, sources, cap=cap: cap)
        assert split.chunks == [cap, cap]
        assert _screen(split) == whole  # exact equality, float64
    images = [images_task(), images_task(steps=5)]
    for t in images:
        t.x_train, t.x_val = t.x_train.double(), t.x_val.double()
    whole = _screen(ModuleObjective(images, (0, 1)))
    split = _screen(ModuleObjective(images, (0, 1), screen_cap=lambda task, sources: 2))
    assert split == whole and all(math.isfinite(v) for v in whole)


def test_make_objective_caps_screens_by_the_jobs_budget():
    from worker.engine.modules import make_objective

    tasks = [synthetic_task(seed=s, dtype=torch.float32) for s in range(4)]
    probe = MetaConfig()
    obj = make_objective(tasks, (0, 1), MetaConfig(job_memory_mb=_budget_for(tasks, probe, 5)))
    assert obj.chunks == [5]
    assert make_objective(tasks, (0, 1), probe).chunks == [512 // 8]
    assert make_objective(tasks, (0, 1)).chunks == [512 // 8]
