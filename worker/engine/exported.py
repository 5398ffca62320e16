"""The ``exported`` model kind: a torch.export program, interpreted by a fixed table of torch functions.

The program comes as plain data (service/exported_files.read_pt2: the archive is read with json and
zipfile, never with torch.export.load, which unpickles). ``ProgramModule`` registers the program's
parameters under their own names (``"0.weight"``: a submodule ``"0"`` holding ``weight``, so
named_parameters() gives the names the user's model has) and runs the graph's nodes in order, each
through ``_FUNCTIONS`` (torch.nn.functional), so it is trained like any other module
(worker/engine/modules.py: functional_call, second-order autograd).

Initialization: ``init="default"`` (the default, like mlp and cnn) draws fresh PyTorch-default
values, in the order the program uses its layers: for each linear/conv2d node, the weight with
``kaiming_uniform_(a=sqrt(5))`` then the bias with ``uniform_(-1/sqrt(fan_in), 1/sqrt(fan_in))``,
exactly what ``nn.Linear``/``nn.Conv2d`` do when constructed; under the same seed this reproduces
build_model's MLP (and build_cnn's stack) when the layers were constructed in the order they are
called. ``init="uploaded"`` starts every draw from the weights in the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import EngineError
from .kinds import ModuleTask
from .tasks import derive_seed

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _linear(a: dict) -> Tensor:
    return F.linear(a["input"], a["weight"], a.get("bias"))


def _conv2d(a: dict) -> Tensor:
    return F.conv2d(
        a["input"],
        a["weight"],
        a.get("bias"),
        stride=a.get("stride", 1),
        padding=a.get("padding", 0),
        dilation=a.get("dilation", 1),
        groups=a.get("groups", 1),
    )


def _max_pool2d(a: dict) -> Tensor:
    k = a["kernel_size"]
    return F.max_pool2d(
        a["self"],
        k,
        stride=a.get("stride") or k,
        padding=a.get("padding", 0),
        dilation=a.get("dilation", 1),
        ceil_mode=a.get("ceil_mode", False),
    )


def _avg_pool2d(a: dict) -> Tensor:
    k = a["kernel_size"]
    return F.avg_pool2d(
        a["self"],
        k,
        stride=a.get("stride") or k,
        padding=a.get("padding", 0),
        ceil_mode=a.get("ceil_mode", False),
        count_include_pad=a.get("count_include_pad", True),
    )


_FUNCTIONS = {
    "linear": _linear,
    "conv2d": _conv2d,
    "relu": lambda a: torch.relu(a["self"]),
    "tanh": lambda a: torch.tanh(a["self"]),
    "sigmoid": lambda a: torch.sigmoid(a["self"]),
    "gelu": lambda a: F.gelu(a["self"], approximate=a.get("approximate", "none")),
    "max_pool2d": _max_pool2d,
    "avg_pool2d": _avg_pool2d,
    "flatten": lambda a: torch.flatten(a["self"], a.get("start_dim", 0), a.get("end_dim", -1)),
}


class ProgramModule(nn.Module):
    """An nn.Module that runs an exported program's graph (read_pt2's ``program``)."""

    def __init__(self, program: Mapping[str, Any], weights: Mapping[str, bytes] | None = None):
        super().__init__()
        self._ops = [dict(op) for op in program["ops"]]
        for op in self._ops:
            if op["short"] not in _FUNCTIONS:
                raise EngineError(f"The exported program uses {op['short']!r}, which the engine cannot train.")
        self._input, self._output = program["input"], program["output"]
        self._arg_to_param: dict[str, str] = {}
        for p in program["params"]:
            dtype = _DTYPES[p["dtype"]]
            if weights is not None:
                data = torch.frombuffer(bytearray(weights[p["name"]]), dtype=dtype).reshape(p["shape"]).clone()
            else:
                data = torch.empty(p["shape"], dtype=dtype)
            owner: nn.Module = self
            *path, leaf = p["name"].split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(data))
            self._arg_to_param[p["arg"]] = p["name"]

    def forward(self, x: Tensor) -> Tensor:
        params = dict(self.named_parameters())
        env: dict[str, Tensor] = {self._input: x}
        for arg, name in self._arg_to_param.items():
            env[arg] = params[name]
        for op in self._ops:
            args = {k: (env[v["tensor"]] if isinstance(v, dict) else v) for k, v in op["args"].items()}
            env[op["out"]] = _FUNCTIONS[op["short"]](args)
        return env[self._output]

    def layers_in_call_order(self) -> list[tuple[str, str | None]]:
        """(weight name, bias name or None) of each linear/conv2d node, in the order they run."""
        out = []
        for op in self._ops:
            if op["short"] in ("linear", "conv2d"):
                w = self._arg_to_param.get(op["args"]["weight"]["tensor"])
                b = op["args"].get("bias")
                out.append((w, self._arg_to_param.get(b["tensor"]) if isinstance(b, dict) else None))
        return out

    def reset_parameters(self) -> None:
        """PyTorch's default initialization of every linear/conv2d layer, in call order (with the
        current RNG); the values are drawn in float32 and cast, like build_model."""
        params = dict(self.named_parameters())
        seen = set()
        for w_name, b_name in self.layers_in_call_order():
            if w_name is None or w_name in seen:
                raise EngineError(
                    "The exported program reuses or computes a layer's weight; it cannot be re-initialized."
                )
            seen.add(w_name)
            w = params[w_name]
            w32 = torch.empty(w.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(w32, a=math.sqrt(5))
            with torch.no_grad():
                w.copy_(w32)
            if b_name is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(w32)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                b32 = torch.empty(params[b_name].shape, dtype=torch.float32)
                nn.init.uniform_(b32, -bound, bound)
                with torch.no_grad():
                    params[b_name].copy_(b32)
                seen.add(b_name)
        left = set(params) - seen
        if left:
            raise EngineError(
                f"The exported program has parameters outside linear and conv2d layers ({', '.join(sorted(left))}); "
                "they have no default initialization: use init='uploaded'."
            )


def exported_task(
    name: str,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    program: Mapping[str, Any],
    weights: Mapping[str, bytes],
    loss: str,
    steps: int,
    batch_size: int,
    seed: int,
    init: str = "default",
) -> ModuleTask:
    """A ModuleTask training the exported program: draw d starts from PyTorch-default values drawn
    under derive_seed("init", seed, d) (init="default"), or from the uploaded weights ("uploaded")."""
    if init not in ("default", "uploaded"):
        raise EngineError("init must be 'default' or 'uploaded'.")
    shape = program.get("input_shape")
    if shape is not None and list(shape[1:]) != list(x_train.shape[1:]):
        raise EngineError(
            f"Task {name!r}: the program was exported for examples of shape {list(shape[1:])}, the data has "
            f"{list(x_train.shape[1:])}."
        )

    def make(draw: int) -> nn.Module:
        module = ProgramModule(program, weights)
        if init == "default":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed("init", seed, draw))
                module.reset_parameters()
        return module

    return ModuleTask(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        loss=loss,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        make_model=make,
    )


def program_summary(program: Mapping[str, Any]) -> Sequence[str]:
    """The operators of a program, in order (for messages)."""
    return [op["short"] for op in program["ops"]]
