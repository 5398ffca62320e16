"""gradtune's meta-optimisation engine: torch and the standard library only.

Learns (learning rate, momentum) for torch.optim.SGD by differentiating the validation loss through
the whole training run (reverse, forward or truncated mode), optionally per Linear layer and as a
piecewise-constant schedule (param groups + boundaries, applied with apply_schedule). Progress and
cancellation come in as callbacks; the meta-state is plain JSON.
"""

from .errors import EngineError
from .functional import METHODS, hypergradient, segment_boundaries, sgd_init, sgd_step, unrolled_val_loss
from .meta import (
    LINE_SEARCH,
    MetaConfig,
    best_settings,
    check_rich,
    choose_method,
    estimate_costs,
    init_state,
    momentum_to_param,
    param_to_momentum,
    run_meta,
    state_iteration,
)
from .reference import (
    EVAL_DRAWS,
    apply_schedule,
    evaluate,
    evaluate_groups,
    evaluate_learned,
    make_optimizer,
    segment_at,
    train_sgd,
    train_sgd_groups,
)
from .tasks import ACTIVATIONS, LOSSES, Task, batch_indices, build_model

__all__ = [
    "ACTIVATIONS",
    "EVAL_DRAWS",
    "METHODS",
    "apply_schedule",
    "choose_method",
    "estimate_costs",
    "evaluate_groups",
    "evaluate_learned",
    "make_optimizer",
    "segment_at",
    "segment_boundaries",
    "train_sgd_groups",
    "LINE_SEARCH",
    "LOSSES",
    "EngineError",
    "MetaConfig",
    "Task",
    "batch_indices",
    "best_settings",
    "check_rich",
    "build_model",
    "evaluate",
    "hypergradient",
    "init_state",
    "momentum_to_param",
    "param_to_momentum",
    "run_meta",
    "sgd_init",
    "sgd_step",
    "state_iteration",
    "train_sgd",
    "unrolled_val_loss",
]
