"""Studies (issue 14): settings learned across jobs that arrive a few tasks at a time, against one
job given every task at once.

    .venv/bin/python benchmarks/studies.py                 # three families, cold jobs as the service's default (~9 min)
    .venv/bin/python benchmarks/studies.py --search line   # cold jobs: the line search, 3 iterations
    .venv/bin/python benchmarks/studies.py --warm half     # warm jobs: the cold search with half its iterations
    .venv/bin/python benchmarks/studies.py --relearn stencil --relearn-iterations 10   # the study's rounds
    .venv/bin/python benchmarks/studies.py --quick         # smoke run (digits-classes, 2 jobs of 4)

Per family of benchmarks/quality.py, tasks [0, 32) arrive as 4 jobs of 8 and tasks [32, 64) judge
(the 32 + 32 split 0 of quality_splits.py): held-out loss with plain torch.optim.SGD on JUDGE_DRAWS,
regret against that set's own 25 x 6 grid, exactly as quality.py scores.

- **one 32-task job**: a cold job on tasks [0, 32) (`--search`: the stencil, 40 iterations, the
  service's default for the pair; or the line search, 3 iterations), started at the default
  (0.01, 0.9).
- **study**: the study's pool takes every task of every job; every 4th task to join (positions 3,
  7, ...) is held out and never trained on, so after 4 jobs it trains on 24 tasks and holds 8.
  Job 1 is cold; jobs 2-4 start warm from the study's settings as the service runs a job that left
  its search to the defaults (gradtune.spec.hyper.warm_meta: 3 line-search iterations; `--warm
  half`: the cold search, half its iterations; worker/engine/study.py warm_config: no population,
  first step 0.25) and train on their 6 non-held-out tasks. After each job the
  study relearns (worker/engine/study.py relearn: rounds of a meta-batch of 16 pool tasks drawn by
  the study's seed, 3 warm line-search iterations each, kept only if not worse on up to 16 other
  pool tasks), starting from the better of its settings and the job's on the first meta-batch.
- **cold twin** of each warm job: the same 6 training tasks, the same search, from the default.

Wall time is the job's search (run_meta) and, separately, the job's evaluation as the service runs
it (start and learned values, plain SGD, its 8 tasks x the 3 evaluation draws); relearning is the
study's own background work, timed on its own. Held-out evaluation of the study: its 8 held-out
tasks on the evaluation draws (what GET /v1/studies/{id}/settings answers).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from quality import DEFAULT, FAMILIES, JUDGE_DRAWS, LR_BOUNDS, MOM_BOUNDS, MOMENTA, grid_argmin, grid_lrs

from gradtune.spec.hyper import constant_fraction, default_iterations, warm_iterations, warm_meta
from worker.engine import EVAL_DRAWS, LINE_SEARCH, MetaConfig, best_settings, evaluate_learned, init_state, run_meta
from worker.engine.functional import Objective
from worker.engine.meta.config import rich_enabled
from worker.engine.study import PoolConfig, relearn, settings_of, warm_config

HOLDOUT_EVERY = 4
STUDY_SEED = 0


# --rich: per-layer values over this many schedule segments (issue 13's rich space), the line search
RICH_SEGMENTS = 4


def job_config(search: str, rich: bool = False) -> MetaConfig:
    if rich:  # the service's defaults for richer values: the line search, 5 + 8 iterations
        iterations = default_iterations("line", True)
        return MetaConfig(
            lr_bounds=LR_BOUNDS,
            momentum_bounds=MOM_BOUNDS,
            **LINE_SEARCH,
            iterations=iterations,
            per_layer=True,
            schedule_segments=RICH_SEGMENTS,
            constant_fraction=constant_fraction("line", iterations),
        )
    kw = {**LINE_SEARCH, "iterations": 3} if search == "line" else {}
    return MetaConfig(lr_bounds=LR_BOUNDS, momentum_bounds=MOM_BOUNDS, **kw)


def loss_of(tasks, s: dict, draws) -> float:
    """Mean held-out loss of settings ``s`` (a pair, or with "param_groups" a table) by plain SGD."""
    return evaluate_learned(tasks, s, draws)["mean_val_loss"]


def run_job(tasks, config: MetaConfig, start: dict) -> tuple[dict, float, float]:
    """(settings, search seconds, evaluation seconds) of one job, as the runner runs it (a study's
    table, in ``start``, is where its richer values start)."""
    t0 = time.perf_counter()
    table = start if "param_groups" in start else None
    state = run_meta(tasks, config, init_state(config, start["lr"], start["momentum"], table=table), config.iterations)
    search_s = time.perf_counter() - t0
    best = settings_of(best_settings(state))
    t0 = time.perf_counter()
    loss_of(tasks, {"lr": start["lr"], "momentum": start["momentum"]}, EVAL_DRAWS)
    loss_of(tasks, best, EVAL_DRAWS)
    return best, search_s, time.perf_counter() - t0


def warm_job_config(config: MetaConfig, rule: str, rich_iterations: int | None = None) -> MetaConfig:
    """What a job of a study that has learned settings runs, started warm (no population, a smaller
    first step): "service": as the service runs a job that left its search to the defaults
    (gradtune.spec.hyper.warm_meta); "half": the job's own search, half its iterations."""
    if rule == "half":
        return warm_config(dataclasses.replace(config, iterations=warm_iterations(config.iterations)))
    rich = rich_enabled(config)
    search, iterations = warm_meta(config.search, config.iterations, rich=rich, defaulted=True)
    if rich and rich_iterations:  # --warm-rich-iterations: tried against the service's rule
        iterations = rich_iterations
    kw = LINE_SEARCH if search == "line" else {"search": search}
    fraction = constant_fraction(search, iterations)  # as the runner's meta_config computes it for the job
    return warm_config(dataclasses.replace(config, **kw, iterations=iterations, constant_fraction=fraction))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--search", choices=["line", "stencil"], default="stencil", help="the cold jobs' search")
    ap.add_argument("--warm", choices=["service", "half"], default="service", help="the warm jobs' search")
    ap.add_argument("--relearn", choices=["line", "stencil"], default=PoolConfig.search)
    ap.add_argument("--relearn-iterations", type=int, default=PoolConfig.iterations)
    ap.add_argument("--rich", action="store_true", help=f"per-layer x {RICH_SEGMENTS} segments studies and jobs")
    ap.add_argument("--warm-rich-iterations", type=int, help="a warm rich job's iterations (default: warm_meta's)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    per_job, jobs = (4, 2) if args.quick else (8, 4)
    families = args.families[:1] if args.quick else args.families
    n_lr = 9 if args.quick else 25
    pairs = [(lr, m) for m in MOMENTA for lr in grid_lrs(n_lr)]
    pool_config = PoolConfig(search=args.relearn, iterations=args.relearn_iterations)
    config = job_config(args.search, args.rich)
    study_config = dataclasses.replace(config, rich_holdout=0)  # as the service's relearn (study_runner)
    summary, timing = [], []
    for fam in families:
        n = per_job * jobs
        tasks = FAMILIES[fam](2 * n)
        stream, judge = tasks[:n], tasks[n:]

        def score(s, judge=judge):
            return loss_of(judge, s, JUDGE_DRAWS)

        grid_pair = grid_argmin(Objective(judge, JUDGE_DRAWS), pairs)
        grid = score({"lr": grid_pair[0], "momentum": grid_pair[1]})
        default = score({"lr": DEFAULT[0], "momentum": DEFAULT[1]})

        def regret(s, grid=grid, default=default, score=score):
            return (score(s) - grid) / (default - grid)

        start = {"lr": DEFAULT[0], "momentum": DEFAULT[1]}
        whole, whole_s, whole_e = run_job(stream, config, start)
        settings = {"lr": DEFAULT[0], "momentum": DEFAULT[1]}
        pool_train, pool_held, trained_on = [], [], set()
        rounds = 0
        history = []
        for j in range(jobs):
            arriving = list(range(j * per_job, (j + 1) * per_job))
            held = [p for p in arriving if p % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
            train_idx = [p for p in arriving if p not in held]
            job_tasks = [stream[p] for p in train_idx]
            if j == 0:
                mine, s_search, s_eval = run_job(job_tasks, config, start)
                cold_search, cold_eval = s_search, s_eval
            else:
                warm = warm_job_config(config, args.warm, args.warm_rich_iterations)
                mine, s_search, s_eval = run_job(job_tasks, warm, settings)
                _, cold_search, cold_eval = run_job(job_tasks, config, start)
            trained_on.update(train_idx)
            pool_train += train_idx
            pool_held += held
            pool_tasks = [stream[p] for p in pool_train]
            t0 = time.perf_counter()
            out = relearn(
                pool_tasks,
                study_config,
                settings,
                seed=STUDY_SEED,
                first_round=rounds,
                pool=pool_config,
                alternatives=[mine],
            )
            relearn_s = time.perf_counter() - t0
            trained_on.update(pool_train[i] for r in out["rounds"] for i in r["batch"])
            rounds += len(out["rounds"])
            settings = out["settings"]
            history.append((j + 1, regret(settings), regret(mine)))
            timing.append((fam, j + 1, j > 0, s_search, s_eval, cold_search, cold_eval, relearn_s))
        assert not trained_on & set(pool_held), "a held-out task was trained on"
        held_tasks = [stream[p] for p in pool_held]
        study_held = loss_of(held_tasks, settings, EVAL_DRAWS)
        summary.append((fam, regret(whole), whole_s + whole_e, regret(settings), history, settings, study_held))
        print(f"{fam}: job32 {regret(whole):+.3f}, study {regret(settings):+.3f}", file=sys.stderr, flush=True)

    space = f"per-layer x {RICH_SEGMENTS} segments, line search" if args.rich else f"{args.search} search"
    print(f"\n### Held out, after {jobs} jobs of {per_job} tasks ({space})\n")
    print(
        f"| family | one {per_job * jobs}-task job: regret | study: regret | difference | study after each job "
        "| each job's own settings | study's held-out loss (its held-out tasks) | study settings |"
    )
    print("|---|---:|---:|---:|---|---|---:|---|")
    for fam, r_whole, _secs, r_study, history, st, held_loss in summary:
        steps = ", ".join(f"{h[1]:+.3f}" for h in history)
        own = ", ".join(f"{h[2]:+.3f}" for h in history)
        table = " + table" if "param_groups" in st else ""
        print(
            f"| {fam} | {r_whole:+.3f} | {r_study:+.3f} | {r_study - r_whole:+.3f} | {steps} | {own} "
            f"| {held_loss:.4f} | lr {st['lr']:.4g}, mom {st['momentum']:.3f}{table} |"
        )
    print(f"\n### Wall time per job ({space}, {per_job - per_job // HOLDOUT_EVERY} training tasks)\n")
    print(
        "| family | job | warm? | search s | evaluation s | cold twin: search s | evaluation s "
        "| warm / cold (search) | warm / cold (job) | study relearn s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for fam, j, warm, ss, se, cs, ce, rs in timing:
        print(
            f"| {fam} | {j} | {'warm' if warm else 'cold'} | {ss:.2f} | {se:.2f} | {cs:.2f} | {ce:.2f} "
            f"| {ss / cs:.2f} | {(ss + se) / (cs + ce):.2f} | {rs:.2f} |"
        )


if __name__ == "__main__":
    main()
