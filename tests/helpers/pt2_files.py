"""A ``.pt2`` archive of an MLP written by hand, laid out as ``torch.export.save`` lays it out
(the parts gradtune reads: archive_format, byteorder, models/model.json, the weights and their
config), so property tests can generate valid archives without torch.
tests/service/test_exported_hostile.py checks that read_pt2 reads one of these exactly as it reads
torch's own archive of the same network.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np


def _size(values: list[int]) -> list[dict[str, int]]:
    return [{"as_int": v} for v in values]


def _meta(shape: list[int]) -> dict[str, Any]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return {
        "dtype": 7,
        "sizes": _size(shape),
        "requires_grad": True,
        "device": {"type": "cpu", "index": None},
        "strides": _size(list(reversed(strides))),
        "storage_offset": {"as_int": 0},
        "layout": 7,
    }


def _name(base: str, k: int) -> str:
    return base if k == 0 else f"{base}_{k}"


def mlp_parts(
    widths: list[int], batch: int, activation: str = "tanh"
) -> tuple[dict, dict, list[tuple[str, list[int]]]]:
    """(model.json, model_weights_config.json, [(parameter name, shape)]) of
    ``nn.Sequential(Linear(w0, w1), act, Linear(w1, w2), ...)`` exported for a batch of ``batch``."""
    params: list[tuple[str, list[int]]] = []
    nodes, values = [], {"input": _meta([batch, widths[0]])}
    current = "input"
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        w, bias = f"{2 * i}.weight", f"{2 * i}.bias"
        params += [(w, [b, a]), (bias, [b])]
        values[f"p_{2 * i}_weight"], values[f"p_{2 * i}_bias"] = _meta([b, a]), _meta([b])
        out = _name("linear", i)
        nodes.append(
            {
                "target": "torch.ops.aten.linear.default",
                "inputs": [
                    {"name": "input", "arg": {"as_tensor": {"name": current}}, "kind": 1},
                    {"name": "weight", "arg": {"as_tensor": {"name": f"p_{2 * i}_weight"}}, "kind": 1},
                    {"name": "bias", "arg": {"as_tensor": {"name": f"p_{2 * i}_bias"}}, "kind": 1},
                ],
                "outputs": [{"as_tensor": {"name": out}}],
                "metadata": {},
                "name": out,
            }
        )
        values[out] = _meta([batch, b])
        current = out
        if i < len(widths) - 2:
            act = _name(activation, i)
            nodes.append(
                {
                    "target": f"torch.ops.aten.{activation}.default",
                    "inputs": [{"name": "self", "arg": {"as_tensor": {"name": current}}, "kind": 1}],
                    "outputs": [{"as_tensor": {"name": act}}],
                    "metadata": {},
                    "name": act,
                }
            )
            values[act] = _meta([batch, b])
            current = act
    specs = [{"parameter": {"arg": {"name": "p_" + n.replace(".", "_")}, "parameter_name": n}} for n, _ in params] + [
        {"user_input": {"arg": {"as_tensor": {"name": "input"}}}}
    ]
    model = {
        "graph_module": {
            "graph": {
                "inputs": [{"as_tensor": {"name": "p_" + n.replace(".", "_")}} for n, _ in params]
                + [{"as_tensor": {"name": "input"}}],
                "outputs": [{"as_tensor": {"name": current}}],
                "nodes": nodes,
                "tensor_values": values,
                "sym_int_values": {},
                "sym_bool_values": {},
                "sym_float_values": {},
                "custom_obj_values": {},
                "is_single_tensor_return": True,
            },
            "signature": {
                "input_specs": specs,
                "output_specs": [{"user_output": {"arg": {"as_tensor": {"name": current}}}}],
            },
        },
        "opset_version": {"aten": 10},
        "range_constraints": {},
        "schema_version": {"major": 8, "minor": 20},
        "verifiers": ["TRAINING"],
        "guards_code": [],
    }
    config = {
        n: {"path_name": f"weight_{k}", "is_param": True, "use_pickle": False, "tensor_meta": _meta(shape)}
        for k, (n, shape) in enumerate(params)
    }
    return model, {"config": config}, params


def write_pt2(
    model: Any, weights_config: Any, weights: dict[str, bytes], extra: dict[str, bytes] | None = None
) -> bytes:
    """The archive of a model.json, a weights config and ``{path_name: bytes}``, stored uncompressed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in weights.items():
            zf.writestr(f"archive/data/weights/{name}", data)
        zf.writestr("archive/data/weights/model_weights_config.json", json.dumps(weights_config))
        zf.writestr("archive/data/constants/model_constants_config.json", json.dumps({"config": {}}))
        zf.writestr("archive/models/model.json", json.dumps(model))
        zf.writestr("archive/archive_format", "pt2")
        zf.writestr("archive/byteorder", "little")
        for name, data in (extra or {}).items():
            zf.writestr(f"archive/{name}", data)
    return buf.getvalue()


def mlp_pt2(
    widths: list[int], batch: int = 5, seed: int = 0, activation: str = "tanh"
) -> tuple[bytes, dict[str, np.ndarray]]:
    """(a .pt2 archive of the MLP, its float32 weights by parameter name)."""
    model, config, params = mlp_parts(widths, batch, activation)
    rng = np.random.default_rng(seed)
    arrays = {n: rng.standard_normal(shape).astype("<f4") for n, shape in params}
    files = {config["config"][n]["path_name"]: arrays[n].tobytes() for n, _ in params}
    return write_pt2(model, config, files), arrays
