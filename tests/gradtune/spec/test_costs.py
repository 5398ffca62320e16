"""gradtune.spec.costs: what runs batched with what, how each part scales, the job's peak, FLOPs
(against torch's own FLOP counter). The bytes against measured memory: test_costs_measured.py."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gradtune.spec import costs
from gradtune.spec.costs import MetaCost, TaskCost, candidates_per_unroll, estimate, evaluation, run_flops
from gradtune.spec.shapes import mlp_shapes


def mlp_task(hidden=(32,), batch=32, steps=100, n_train=1437, n_val=360, group="g", kind="mlp", in_f=64, out=10):
    s = mlp_shapes(in_f, hidden, out, "tanh")
    return TaskCost(
        params=s.params,
        activations=s.activations,
        macs=s.macs,
        batch_size=batch,
        steps=steps,
        n_train=n_train,
        n_val=n_val,
        in_elements=in_f,
        out_features=out,
        kind=kind,
        group=group,
    )


def test_candidates_per_unroll_follow_the_engines_chunks():
    assert candidates_per_unroll(64, 45, "mlp") == 8  # 512 // 64
    assert candidates_per_unroll(2, 45, "mlp") == 45
    assert candidates_per_unroll(2, 300, "mlp") == 256
    assert candidates_per_unroll(2, 300, "module") == 64  # 128 // 2
    assert candidates_per_unroll(1000, 9, "mlp") == 1  # at least one


def test_equal_mlps_batch_together_and_others_do_not():
    meta = MetaCost(draws=2)
    same = [mlp_task() for _ in range(4)]
    assert evaluation(same, meta, "screen", 9).runs == 9 * 4 * 2
    assert evaluation(same, meta, "reverse").runs == 4 * 2
    apart = [mlp_task(group=i) for i in range(4)]
    assert evaluation(apart, meta, "screen", 9).runs == 9 * 2
    # one cnn puts every task on the module path, which batches equal keys too (module_unroll.py):
    # the four mlps in one unroll, the cnn without a key in a group of its own draws
    mixed = [*same, mlp_task(kind="module", group=None)]
    assert costs.path_of(mixed) == "module" and costs.path_of(same) == "mlp"
    assert evaluation(mixed, meta, "screen", 9).runs == 9 * 4 * 2
    cnns = [mlp_task(kind="module", group="cnn") for _ in range(3)]
    assert evaluation(cnns, meta, "reverse").runs == 3 * 2
    assert evaluation([*cnns, mlp_task(kind="module", group=None)], meta, "reverse").runs == 3 * 2


def test_screen_bytes_by_hand():
    t = mlp_task(batch=32, n_val=360)
    s, e = costs.SCREEN["mlp"], 4
    runs, k = 18, 9  # 9 candidates x 2 draws; the mlp path validates one source (9 runs) at a time
    want = e * (runs * s["P"] * t.params + max(runs * s["A"] * 32 * t.activations, k * s["V"] * 360 * t.activations))
    assert evaluation([t], MetaCost(), "screen", 9).bytes == int(want)


def test_reverse_grows_with_steps_forward_does_not_truncated_stops_at_its_window():
    meta = MetaCost(truncation=20)

    def hyper(method, steps):
        return costs.hypergradient_bytes([mlp_task(steps=steps)], meta, method)

    r1, r2, r3 = hyper("reverse", 100), hyper("reverse", 200), hyper("reverse", 300)
    assert r2 - r1 == r3 - r2 > 0
    assert hyper("forward", 100) == hyper("forward", 10_000)
    assert hyper("truncated", 20) == hyper("reverse", 20)
    assert hyper("truncated", 100) == hyper("truncated", 10_000) == hyper("reverse", 20)
    # forward carries one tangent per hyperparameter: the richer table costs more
    assert costs.hypergradient_bytes([mlp_task()], MetaCost(segments=4), "forward") > hyper("forward", 100)


def test_auto_takes_reverse_when_it_fits_then_forward_then_truncated():
    t = mlp_task(steps=1000)
    rev = costs.hypergradient_bytes([t], MetaCost(), "reverse")
    fwd = costs.hypergradient_bytes([t], MetaCost(), "forward")
    assert fwd < rev
    assert costs.resolve_method([t], MetaCost(memory_budget_bytes=rev)) == "reverse"
    assert costs.resolve_method([t], MetaCost(memory_budget_bytes=rev - 1)) == "forward"
    assert costs.resolve_method([t], MetaCost(memory_budget_bytes=fwd - 1)) == "truncated"
    assert costs.resolve_method([t], MetaCost(method="forward", memory_budget_bytes=1)) == "forward"


def test_the_peak_is_the_data_plus_the_largest_part():
    tasks = [mlp_task() for _ in range(3)]
    est = estimate(tasks, MetaCost(iterations=5))
    own, prepared, build = costs.data_bytes(tasks, MetaCost())
    assert (est.task_bytes, est.data_bytes, est.build_bytes) == (own, own + prepared, build)
    assert (
        est.peak_bytes == own + prepared + max(build, est.peak_part.bytes) + costs.SLACK_BYTES + costs.LOOP_SLACK_BYTES
    )
    assert est.peak_part.bytes == max(p.bytes for p in est.parts)
    assert est.part("start").runs == 45 * 6 and est.part("refine").runs == 9 * 6  # candidates x sources
    assert est.part("hypergradient").runs == 6
    assert {p.name for p in est.parts} == {"start", "hypergradient", "refine", "evaluation"}
    rich = estimate(tasks, MetaCost(iterations=5, slots=2, segments=2))
    assert {p.name for p in rich.parts} >= {"rich_hypergradient", "rich_refine"}
    assert rich.hyperparameters == 8 and est.hyperparameters == 2


def test_the_indices_of_every_step_are_data():
    """8 bytes per row of every batch of every (task, draw): 10,000 steps of 1024 rows x 64 sources."""
    tasks = [mlp_task(hidden=(4096,), batch=1024, steps=10_000) for _ in range(32)]
    _own, prepared, build = costs.data_bytes(tasks, MetaCost())
    assert prepared >= 8 * 10_000 * 1024 * 64
    assert build >= 8 * 10_000 * 1024 * 64


def test_the_issue_job_cannot_fit():
    """32 tasks, hidden [4096], 10,000 steps, batch 1024 (the worker grew to 23 GB and was killed):
    the start already screens 8 candidates x 64 sources in one unroll, over 23 GiB; neither reverse
    nor forward fits the 2 GiB budget for 64 runs, so auto takes truncated, whose 20 steps of graph
    for 64 runs of 1024 rows are larger still."""
    tasks = [mlp_task(hidden=(4096,), batch=1024, steps=10_000) for _ in range(32)]
    est = estimate(tasks, MetaCost(iterations=1000))
    start = est.part("start")
    assert (start.runs, start.candidates) == (512, 8)
    assert start.bytes > 23 * 1024**3
    assert est.method == "truncated"
    assert est.peak_part.name == "hypergradient" and est.peak_part.runs == 64


def test_flops_scale_by_method():
    t = mlp_task()
    one = run_flops(t, "screen")
    assert one == t.steps * (6 * t.macs * t.batch_size + 4 * t.params) + 2 * t.macs * t.n_val
    assert run_flops(t, "reverse") == 3 * one
    assert run_flops(t, "forward", hyper=2) == 5 * one
    assert run_flops(t, "truncated", truncation=20) == pytest.approx(one * (1 + 2 * 20 / 100))
    meta = MetaCost()
    assert evaluation([t], meta, "screen", 9).flops == 9 * 2 * one
    assert estimate([t], replace(meta, iterations=40)).flops > estimate([t], replace(meta, iterations=10)).flops


@pytest.mark.parametrize("widths", [[64, 32, 10], [30, 128, 64, 2]])
def test_a_training_step_costs_what_torch_counts(widths):
    """6 MACs per example (forward 2, backward 4) bound torch's count of a real step from above; the
    first layer needs no input gradient, which is what the bound gives away (at most 1/3)."""
    batch = 16
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    model = nn.Sequential(*layers)
    x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    counted = counter.get_total_flops()
    s = mlp_shapes(widths[0], widths[1:-1], widths[-1], "tanh")
    t = TaskCost(
        params=s.params,
        activations=s.activations,
        macs=s.macs,
        batch_size=batch,
        steps=1,
        n_train=batch,
        n_val=0,
        in_elements=widths[0],
        out_features=widths[-1],
    )
    model_flops = run_flops(t, "screen") - 4 * s.params  # the update is not a matmul
    assert counted <= model_flops <= 1.5 * counted
    assert math.isclose(model_flops, 6 * s.macs * batch)
