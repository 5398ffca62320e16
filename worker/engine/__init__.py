"""gradtune's meta-optimisation engine: torch and the standard library only.

Learns (learning rate, momentum) for torch.optim.SGD by differentiating the validation loss through
the whole training run. Progress and cancellation come in as callbacks; the meta-state is plain JSON.
"""

from .errors import EngineError
from .functional import hypergradient, sgd_init, sgd_step, unrolled_val_loss
from .meta import (
    MetaConfig,
    best_settings,
    init_state,
    momentum_to_param,
    param_to_momentum,
    run_meta,
    state_iteration,
)
from .reference import EVAL_DRAWS, evaluate, train_sgd
from .tasks import ACTIVATIONS, LOSSES, Task, batch_indices, build_model

__all__ = [
    "ACTIVATIONS",
    "EVAL_DRAWS",
    "LOSSES",
    "EngineError",
    "MetaConfig",
    "Task",
    "batch_indices",
    "best_settings",
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
