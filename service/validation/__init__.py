"""Checks on a job body that pydantic's field-by-field validation cannot make.

``check_job`` returns a list of errors in the shape of FastAPI's validation errors,
``{"loc": ["body", "tasks", 0, "data", "x_val"], "msg": "...", "type": "..."}``, so that the
API answers them exactly like schema errors (422 with the field path and a sentence).
Only the first offending row of an array is reported: bodies can hold megabytes of numbers.

By concern: ``jobs`` (check_job, limits, hyperparameters), ``data`` (inline, builtin and uploaded
data), ``models`` (cnn layers through gradtune.spec.shapes, exported programs), ``admission``
(memory, by the cost model in gradtune.spec.costs), ``common`` (what they share).
"""

from service.validation.admission import (
    check_job_memory,
    cnn_unroll_bytes,
    estimate_unroll_bytes,
    meta_cost,
    unroll_need,
)
from service.validation.common import FLOAT_BYTES, GIB, TaskIO, builtin_split_sizes, layer_widths, task_io
from service.validation.jobs import check_job
from service.validation.models import cnn_layer_shapes

__all__ = [
    "FLOAT_BYTES",
    "GIB",
    "TaskIO",
    "builtin_split_sizes",
    "check_job",
    "check_job_memory",
    "cnn_layer_shapes",
    "cnn_unroll_bytes",
    "estimate_unroll_bytes",
    "layer_widths",
    "meta_cost",
    "task_io",
    "unroll_need",
]
