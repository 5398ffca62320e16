"""The meta-loop: learn (lr, momentum) for torch.optim.SGD, robustly; then, optionally, per layer
and per block of steps.

Parameters theta = (log lr, z), momentum = lo + (hi - lo) * sigmoid(z), both kept inside bounds.
The meta-loss L(theta) is the mean validation loss after training, over every task and every draw
in MetaConfig.draws (all runs are batched into one unroll).

Iteration 1 ("start") finds a finite starting point. With the population on (default) it evaluates,
forward only and batched, the starting lr times 10**(k/2), |k| <= 4, at the starting momentum and at
0, 0.5, 0.9, 0.99, and starts from the best. Without it, the starting point itself is used. Either way,
if training diverges there the lr is backed off (/ backoff_factor, a few times); if nothing finite
is found, EngineError. One reverse pass gives L and the hypergradient at the chosen point.

Every later iteration ("refine") builds candidates around theta at the current step h: the
hypergradient move theta - h * sign(g) (sign, because near the edge of stability the hypergradient's
magnitude is meaningless: 1e4 to 1e17 was measured), projected onto the bounds, with the log-lr
move capped; and, with the stencil on (default), the 8 neighbours theta + h * {-1, 0, 1}^2 (4
with stencil_diagonals=False). One batched forward pass screens them; the best, if lower than
L(theta), is accepted; then h grows, otherwise h shrinks. A winning hypergradient move is verified by
a reverse pass (which also gives its hypergradient) and accepted only if that loss is finite and
lower. A winning stencil move is accepted on its screened loss, the same full-training meta-loss
(tests check they agree), and the hypergradient there is left unknown, so the next iteration screens
the stencil; verify_stencil=True computes the reverse pass for it too. While h <= max_log_lr_step the
sign move is itself one of the 8 neighbours, so with the stencil on the hypergradient labels a
candidate rather than adding one: skipping those reverse passes left every benchmark's answer
unchanged (docs/benchmarks.md). A rejection at the smallest step means convergence: the remaining iterations
are recorded as "converged" without computing anything. Non-finite losses are never accepted and
a non-finite hypergradient is stored as None (the stencil still moves). The best point seen is
what best_settings returns.

Measured (docs/benchmarks.md): for the constant pair the population and the stencil do most of the
work; near the edge of stability, where the best settings sit, the hypergradient is dominated by
chaos and is rarely the move that wins (it wins where the loss is smooth: small learning rates,
regression). For the per-layer / scheduled tables the hypergradient's direction does the work: a
line search along it moves 16-24 values at once and beat Optuna TPE on the same values and time on
10 of 12 held-out splits (benchmarks/search_targets.py), where moving each value alone costs 5-13x.

Hypergradient method (MetaConfig.method): "reverse", "forward", "truncated" or "auto"; the one
used is chosen once, at the first run_meta call, and kept in state["method"] with a sentence saying
why in state["method_reason"] (choose_method); every record carries "method". Only hypergradients
depend on it: losses are always those of the full training run.

Richer hyperparameters (MetaConfig.per_layer, MetaConfig.schedule_segments): the constant pair is
learned first, as above, for at most iterations * constant_fraction iterations (fewer if it
converges). Then ("rich_start") the (slots x segments) table of values starts at the best constant
pair, and every "rich_refine" iteration runs the same search on the table (search.py: the constant
pair is its 1 x 1 case), with the table's policy: it screens the sign-hypergradient move of all
values at once, each value alone moved up and down by the step, and rich_random_directions random
joint moves (every value +-step, seeded by the iteration); the best, if lower, is verified with a
hypergradient pass and accepted if its loss really is lower and it passes the stability margin.
Values are clamped to the same bounds as the constant pair. With search="line" the table is
line-searched along its hypergradient (all values at once), and a line that finds nothing lower is
retried at half the step (not the stencil, which for 16 values screens 40 candidates); a miss at the
smallest step ends the table's search. The richer search never sees every rich_holdout-th task (the
4th, 8th, ... once a job has 16 tasks); at its rich_refit-th last iteration (3), or when it ends,
check_rich keeps the table only if it beats the best constant pair on those held-back tasks (8
fresh draws), and the iterations left search it over every task; otherwise best_settings returns
the pair in the table's form with "rich_check" saying why. Those records carry the richer loss as
"meta_loss", the best constant pair as "lr"/"momentum", and "group_lr"/"group_momentum"
([slot][segment]) and "meta_loss_groups" (best richer loss so far). best_settings keeps the best
constant pair at the top level and adds "param_groups", "boundaries", "meta_loss_groups".

All randomness derives from the tasks' seeds and draws and from the iteration number; the state is
plain JSON (state.py: version 2, version 1 still read), so a run split into chunks (with a JSON
round trip between them) gives the same result as one run.

Files: config.py (MetaConfig, LINE_SEARCH, checks), state.py (typed state and its JSON form),
search.py (the one search and its policies), evaluate.py (meta-losses for the search), costs.py
(estimate_costs, choose_method), loop.py (init_state, run_meta, best_settings).
"""

from gradtune.spec.hyper import momentum_to_param, param_to_momentum

from .config import LINE_SEARCH, MetaConfig
from .costs import choose_method, estimate_costs
from .loop import best_settings, check_rich, held_back, init_state, run_meta, state_iteration
from .state import STATE_VERSION, MetaState

__all__ = [
    "LINE_SEARCH",
    "STATE_VERSION",
    "MetaConfig",
    "MetaState",
    "best_settings",
    "check_rich",
    "held_back",
    "choose_method",
    "estimate_costs",
    "init_state",
    "momentum_to_param",
    "param_to_momentum",
    "run_meta",
    "state_iteration",
]
