"""Issue 13's targets for the search, family by family and split by split, peers side by side.

    .venv/bin/python benchmarks/search_targets.py                        # 3 families x 4 splits of 8 + 8 tasks
    .venv/bin/python benchmarks/search_targets.py --tasks 32 --splits 2  # 2 splits of 32 + 32 tasks
    .venv/bin/python benchmarks/search_targets.py --quick                # smoke run

Families and scoring are benchmarks/quality.py's (split s learns on tasks [2ns, 2ns + n) and is
judged on the next n, as quality_splits.py; regret = (held-out loss - grid) / (default - grid), the
grid chosen on the held-out tasks themselves). Per split it measures:

- the train-grid reference: the 25 x 6 grid chosen on the train tasks and training draws (the exact
  minimiser of the training objective, to grid resolution) scored held out;
- Optuna TPE-20 as users run it (a plain torch.optim.SGD loop per trial, seed 0) and TPE-20 on the
  engine's batched evaluator (mean of seeds 0-4);
- gradtune's constant-pair searches (--pair names which; the first is the candidate default);
- per-layer x 4 segments: gradtune (--rich names the configs), and TPE on the same 16-24 values with
  the batched evaluator for the same wall time as gradtune's rich job.

Targets (issue 13): pair regret within 0.03 of the train-grid row in at most 0.5x the wall time of
TPE-20 as users run it; rich regret below TPE's on the same space and time, and below 0 (better than
the best constant pair), in at most 4x the pair job's time. The summary table says which are met.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from quality import (
    DEFAULT,
    FAMILIES,
    JUDGE_DRAWS,
    LR_BOUNDS,
    MOM_BOUNDS,
    MOMENTA,
    TRAIN_DRAWS,
    Objective,
    PlainLoop,
    evaluate,
    evaluate_groups,
    grid_argmin,
    grid_lrs,
    optuna_tpe,
)

from worker.engine import LINE_SEARCH, MetaConfig, best_settings, init_state, run_meta

# Constant-pair searches. "line-N": LINE_SEARCH with N iterations; "stencil-N": the stencil search.
# A "+dK" suffix trains on K draws (0..K-1) instead of MetaConfig's two.
PAIRS = {
    "line-3": {**LINE_SEARCH, "iterations": 3},
    "line-5": {**LINE_SEARCH, "iterations": 5},
    "line-8": {**LINE_SEARCH, "iterations": 8},
    "line-5+d4": {**LINE_SEARCH, "iterations": 5, "draws": (0, 1, 2, 3)},
    "stencil-40": {"iterations": 40},
}
# Per-layer x 4 segments: "<pair>/rN": the pair search, then N iterations of the table (line search).
RICH = {
    "line-3/r6": {**LINE_SEARCH, "iterations": 9, "constant_fraction": 3 / 9},
    "line-5/r8": {**LINE_SEARCH, "iterations": 13, "constant_fraction": 5 / 13},
    "line-20/r20": {**LINE_SEARCH, "iterations": 40},
    "line-5/r8, no check": {**LINE_SEARCH, "iterations": 13, "constant_fraction": 5 / 13, "rich_holdout": 0},
}
RICH_SPACE = {"per_layer": True, "schedule_segments": 4}


def fmt(r: float) -> str:
    """A regret, or what happened when the held-out training diverged (or nearly)."""
    return f"{r:+.3f}" if math.isfinite(r) and abs(r) < 1e3 else "diverged"


def gradtune(train, kw: dict) -> tuple[dict, float]:
    config = MetaConfig(lr_bounds=LR_BOUNDS, momentum_bounds=MOM_BOUNDS, **kw)
    t0 = time.perf_counter()
    state = run_meta(train, config, init_state(config, *DEFAULT), config.iterations)
    return best_settings(state), time.perf_counter() - t0


def tpe_table(obj: Objective, slots: int, segs: int, seconds: float, seed: int = 0) -> tuple[list, list, int]:
    """Optuna TPE over every (slot, segment) lr and momentum, on the batched evaluator, for `seconds`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        lr = torch.tensor(
            [[trial.suggest_float(f"lr{i}_{j}", *LR_BOUNDS, log=True) for j in range(segs)] for i in range(slots)],
            dtype=torch.float64,
        )
        mom = torch.tensor(
            [[trial.suggest_float(f"m{i}_{j}", *MOM_BOUNDS) for j in range(segs)] for i in range(slots)],
            dtype=torch.float64,
        )
        loss = obj.losses_values(lr.unsqueeze(0), mom.unsqueeze(0))[0]
        return loss if math.isfinite(loss) else 1e10

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, timeout=seconds)
    p = study.best_params
    lrs = [[p[f"lr{i}_{j}"] for j in range(segs)] for i in range(slots)]
    moms = [[p[f"m{i}_{j}"] for j in range(segs)] for i in range(slots)]
    return lrs, moms, len(study.trials)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--splits", type=int, default=4)
    ap.add_argument("--first-split", type=int, default=0)
    ap.add_argument("--tasks", type=int, default=8, help="train tasks and held-out tasks per split")
    ap.add_argument("--pair", nargs="+", default=["line-5", "line-3", "stencil-40"], choices=list(PAIRS))
    ap.add_argument("--rich", nargs="*", default=["line-5/r8", "line-5/r8, no check"], choices=list(RICH))
    ap.add_argument("--no-plain", action="store_true", help="skip TPE-20 as users run it (slow)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import optuna  # noqa: F401  (imported before any clock starts)

    n = args.tasks
    lrs = grid_lrs(9 if args.quick else 25)
    pairs = [(lr, m) for m in MOMENTA for lr in lrs]
    summary: list[tuple] = []
    for fam in args.families:
        splits = range(args.first_split, args.first_split + args.splits)
        tasks = FAMILIES[fam](2 * n * (max(splits) + 1))
        for sp in splits:
            train, held = tasks[2 * n * sp : 2 * n * sp + n], tasks[2 * n * sp + n : 2 * n * (sp + 1)]
            g = grid_argmin(Objective(held, JUDGE_DRAWS), pairs)

            def score(lr, mom, held=held):
                return evaluate(held, lr, mom, JUDGE_DRAWS)["mean_val_loss"]

            grid, default = score(*g), score(*DEFAULT)

            def regret(loss, grid=grid, default=default):
                return (loss - grid) / (default - grid)

            train_obj = Objective(train, TRAIN_DRAWS)
            rows: dict[str, tuple[float, float, str]] = {}
            t0 = time.perf_counter()
            t = grid_argmin(train_obj, pairs)
            rows["train grid"] = (regret(score(*t)), time.perf_counter() - t0, f"{t[0]:.3g}/{t[1]:.2f}")
            if not args.no_plain:
                t0 = time.perf_counter()
                p = optuna_tpe(PlainLoop(train, TRAIN_DRAWS), 20)
                rows["TPE-20 plain loop"] = (regret(score(*p)), time.perf_counter() - t0, f"{p[0]:.3g}/{p[1]:.2f}")
            runs = []
            for seed in range(5):
                t0 = time.perf_counter()
                p = optuna_tpe(train_obj, 20, seed=seed)
                runs.append((regret(score(*p)), time.perf_counter() - t0))
            rows["TPE-20 batched (5 seeds)"] = (
                statistics.mean(r[0] for r in runs),
                statistics.mean(r[1] for r in runs),
                "",
            )
            for name in args.pair:
                best, secs = gradtune(train, PAIRS[name])
                rows[f"gradtune {name}"] = (
                    regret(score(best["lr"], best["momentum"])),
                    secs,
                    f"{best['lr']:.3g}/{best['momentum']:.2f}",
                )
            for name in args.rich:
                best, secs = gradtune(train, {**RICH[name], **RICH_SPACE})
                loss = evaluate_groups(held, best["param_groups"], best["boundaries"], JUDGE_DRAWS)["mean_val_loss"]
                check = best.get("rich_check")
                rows[f"gradtune rich {name}"] = (regret(loss), secs, f"kept {check['kept']}" if check else "")
                slots, segs = len(best["param_groups"]), len(best["boundaries"])
                t0 = time.perf_counter()
                t_lrs, t_moms, trials = tpe_table(train_obj, slots, segs, secs)
                tsecs = time.perf_counter() - t0
                groups = [
                    {"params": grp["params"], "lr": t_lrs[i], "momentum": t_moms[i]}
                    for i, grp in enumerate(best["param_groups"])
                ]
                loss = evaluate_groups(held, groups, best["boundaries"], JUDGE_DRAWS)["mean_val_loss"]
                rows[f"TPE rich, same time ({name})"] = (regret(loss), tsecs, f"{trials} trials")
            print(f"\n#### {fam}, split {sp}: {n} + {n} tasks\n")
            print("| method | regret | wall s | answer |\n|---|---:|---:|---|")
            for name, (r, s, a) in rows.items():
                print(f"| {name} | {fmt(r)} | {s:.2f} | {a} |", flush=True)
            summary.append((fam, sp, rows))
    _targets(summary, args)


def _targets(summary, args) -> None:
    print("\n### Against issue 13's targets\n")
    print(
        "| family | split | pair search | regret - train grid's | wall / TPE-20 plain | wall / TPE-20 batched "
        "| rich | rich regret | TPE same space | rich / pair wall |"
    )
    print("|---|---:|---|---:|---:|---:|---|---:|---:|---:|")
    for fam, sp, rows in summary:
        ref = rows["train grid"][0]
        plain = rows.get("TPE-20 plain loop", (None, math.nan))[1]
        batched = rows["TPE-20 batched (5 seeds)"][1]
        pair = args.pair[0]
        r, s, _ = rows[f"gradtune {pair}"]
        for name in args.rich or [None]:
            rich = rows.get(f"gradtune rich {name}")
            tpe = rows.get(f"TPE rich, same time ({name})")
            cells = [name, f"{rich[0]:+.3f}", f"{tpe[0]:+.3f}", f"{rich[1] / s:.1f}"] if rich and tpe else ["-"] * 4
            print(
                f"| {fam} | {sp} | {pair} | {r - ref:+.3f} | {s / plain:.2f} | {s / batched:.2f} | "
                + " | ".join(cells)
                + " |"
            )


if __name__ == "__main__":
    main()
