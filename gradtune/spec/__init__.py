"""The facts the API, the engine and the client share: standard library only, never torch.

``worker/engine`` (torch), ``service`` (no torch) and the ``gradtune`` client all import what they
share from here, so each fact is written once:

* :mod:`gradtune.spec.vocab`: the vocabularies (activations, losses, cnn layer types, builtin
  datasets, job statuses as an enum).
* :mod:`gradtune.spec.hyper`: the momentum map (momentum <-> the unbounded parameter the search
  moves) and the learning-rate bounds arithmetic.
* :mod:`gradtune.spec.shapes`: an mlp's or a cnn's output shape per layer, parameters, activations
  and multiply-adds per example (SpecError names the layer that cannot work).
* :mod:`gradtune.spec.devices`: the devices a job may ask for (auto, cpu, cuda) and the broker
  queue each one goes to; the queues a worker on a device consumes.
* :mod:`gradtune.spec.costs`: the cost model: bytes and FLOPs of an evaluation, a meta-iteration
  and a whole job as the engine batches it (docs/cost_model.md).

Nothing here may import anything outside the standard library (tests/spec checks it).
"""

from gradtune.spec.costs import CostEstimate, MetaCost, Part, TaskCost, estimate
from gradtune.spec.devices import JOB_DEVICES, WORKER_DEVICES, job_queue, worker_queues
from gradtune.spec.hyper import Z_LIMIT, clamp, momentum_to_param, param_to_momentum
from gradtune.spec.shapes import ModelShapes, SpecError, cnn_shapes, mlp_shapes
from gradtune.spec.vocab import (
    ACTIVATIONS,
    ACTIVE_STATUSES,
    ADMIN_KEY_FILE,
    BUILTIN_DATASETS,
    CNN_LAYER_TYPES,
    DEFAULT_TENANT,
    LOSSES,
    STATUSES,
    TENANT_RE,
    TENANT_RULE,
    TERMINAL_STATUSES,
    JobStatus,
)

__all__ = [
    "ACTIVATIONS",
    "ACTIVE_STATUSES",
    "ADMIN_KEY_FILE",
    "BUILTIN_DATASETS",
    "CNN_LAYER_TYPES",
    "DEFAULT_TENANT",
    "JOB_DEVICES",
    "LOSSES",
    "STATUSES",
    "TENANT_RE",
    "TENANT_RULE",
    "TERMINAL_STATUSES",
    "WORKER_DEVICES",
    "Z_LIMIT",
    "CostEstimate",
    "JobStatus",
    "MetaCost",
    "ModelShapes",
    "Part",
    "SpecError",
    "TaskCost",
    "clamp",
    "cnn_shapes",
    "estimate",
    "job_queue",
    "mlp_shapes",
    "momentum_to_param",
    "param_to_momentum",
    "worker_queues",
]
