"""Many runs of one model at once, without vmap: the model as a small program of known functions.

modules.py trains R runs (candidates x draws x tasks) of a model together. With ``torch.func.vmap``
over ``functional_call`` that costs, per step, a second-order graph through functorch's batching
rules: a convolution with per-run weights becomes a grouped convolution (slow on the CPU for small
images, and its output's layout makes the max-pool after it slower still) and every op goes
through the batching layer. Profiled on the digits CNN (conv 8 k3, relu, maxpool, linear; batch 32,
K = 100, one thread): 0.4-0.5x torchopt on one task and no gain from batching tasks
(docs/benchmarks.md, "Throughput for every model kind").

So when the model is a chain of functions the engine knows (an nn.Sequential of Conv2d, Linear,
ReLU, Tanh, Sigmoid, GELU, MaxPool2d, AvgPool2d, Flatten: the cnn kind and build_model's MLP; or an
exported program, exported.ProgramModule), it is run here on all runs at once: the activations
hold every run's examples along the first dimension (R * B, ...), functions without parameters are
called on them as they are, and the two layers with parameters use each run's own weights: linear
as a batched matmul (R, B, in) x (R, in, out), conv2d as im2col by Tensor.unfold (views) and a
batched matmul whose output is laid out channels-last, which is also the layout max_pool2d is
fastest on. The training gradients come from torch.autograd.grad of the summed per-run losses
(runs are independent, so each run's parameters get its own loss's gradient), with create_graph
when the hypergradient goes through them.

``program_of`` returns None for anything else (the caller keeps vmap), and checks the program
against the module itself on two runs before anyone uses it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .exported import _FUNCTIONS, ProgramModule
from .losses import cross_entropy_terms

Ref = tuple[str, Any]  # ("t", activation name) | ("p", parameter name) | ("c", constant)


@dataclass(frozen=True)
class Program:
    """A model as a chain of _FUNCTIONS calls. ops: (function, output name, ((arg, Ref), ...))."""

    input: str
    output: str
    ops: tuple[tuple[str, str, tuple[tuple[str, Ref], ...]], ...]

    @property
    def key(self) -> Hashable:
        """Equal keys: the same function of (parameters, input)."""
        return (self.input, self.output, self.ops)


def _const(v: Any) -> Any:
    return tuple(_const(x) for x in v) if isinstance(v, list | tuple) else v


def _layer_op(i: int, m: nn.Module, src: str) -> tuple[str, tuple[tuple[str, Ref], ...]] | None:
    """One nn.Sequential entry as a _FUNCTIONS call, or None if not one the engine knows."""
    t = type(m)
    if t is nn.Linear or t is nn.Conv2d:
        args: dict[str, Ref] = {"input": ("t", src), "weight": ("p", f"{i}.weight")}
        args["bias"] = ("p", f"{i}.bias") if m.bias is not None else ("c", None)
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                return None
            for k in ("stride", "padding", "dilation", "groups"):
                args[k] = ("c", _const(getattr(m, k)))
        return ("linear" if t is nn.Linear else "conv2d"), tuple(args.items())
    if t in (nn.ReLU, nn.Tanh, nn.Sigmoid):
        return {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}[t], (("self", ("t", src)),)
    if isinstance(m, nn.GELU) and t is nn.GELU:
        return "gelu", (("self", ("t", src)), ("approximate", ("c", m.approximate)))
    if isinstance(m, nn.MaxPool2d) and t is nn.MaxPool2d and not m.return_indices:
        keys = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        return "max_pool2d", (("self", ("t", src)), *((k, ("c", _const(getattr(m, k)))) for k in keys))
    if isinstance(m, nn.AvgPool2d) and t is nn.AvgPool2d and m.divisor_override is None:
        keys = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
        return "avg_pool2d", (("self", ("t", src)), *((k, ("c", _const(getattr(m, k)))) for k in keys))
    if isinstance(m, nn.Flatten) and t is nn.Flatten:
        return "flatten", (("self", ("t", src)), ("start_dim", ("c", m.start_dim)), ("end_dim", ("c", m.end_dim)))
    return None


def _sequential_program(model: nn.Sequential) -> Program | None:
    ops = []
    src = "x"
    for i, (name, m) in enumerate(model.named_children()):
        if name != str(i):
            return None
        op = _layer_op(i, m, src)
        if op is None:
            return None
        ops.append((op[0], f"h{i}", op[1]))
        src = f"h{i}"
    return Program("x", src, tuple(ops)) if ops else None


def _exported_program(model: ProgramModule) -> Program | None:
    params = model._arg_to_param
    ops = []
    for op in model._ops:
        args: list[tuple[str, Ref]] = []
        for k, v in op["args"].items():
            if isinstance(v, Mapping):
                name = v["tensor"]
                if name in params:
                    if op["short"] not in ("linear", "conv2d") or k not in ("weight", "bias"):
                        return None  # a parameter used any other way: not a layer's own weight
                    args.append((k, ("p", params[name])))
                else:
                    args.append((k, ("t", name)))
            else:
                args.append((k, ("c", _const(v))))
        ops.append((op["short"], op["out"], tuple(sorted(args))))
    return Program(model._input, model._output, tuple(ops))


# --------------------------------------------------------------------------- running it on R runs
# Layout: every activation is (R, *example shape, B): the runs first, each run's examples last
# (innermost). Then a linear layer is one batched matmul W (R, out, in) x (R, in, B) with no
# transposes, flatten is a view, a convolution's im2col copies contiguous runs of B, its output
# (R, O, oh, ow, B) comes out of the matmul as it is, and pooling sees it as channels-last images
# (R * C, B, H, W), the layout max_pool2d is fastest on.


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def _rank(x: Tensor, rank: int, what: str) -> None:
    if x.dim() != rank:
        raise ValueError(f"{what} of a {x.dim() - 2}-d example")


def _linear(a: dict) -> Tensor:
    x, w, b = a["input"], a["weight"], a.get("bias")
    _rank(x, 3, "linear")
    return torch.bmm(w, x) if b is None else torch.baddbmm(b.unsqueeze(2), w, x)


def _conv2d(a: dict) -> Tensor:
    x, w, b = a["input"], a["weight"], a.get("bias")
    _rank(x, 5, "conv2d")
    if int(a.get("groups", 1)) != 1 or _pair(a.get("dilation", 1)) != (1, 1) or isinstance(a.get("padding"), str):
        raise ValueError("grouped, dilated or string-padded convolutions are not batched here")
    (sh, sw), (ph, pw) = _pair(a.get("stride", 1)), _pair(a.get("padding", 0))
    runs, c = x.shape[0], x.shape[1]
    o, kh, kw = w.shape[1], w.shape[3], w.shape[4]
    if ph or pw:
        x = F.pad(x, (0, 0, pw, pw, ph, ph))
    oh, ow, n = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1, x.shape[4]
    if x.requires_grad:  # one unfold: its backward is one op
        cols = x.unfold(2, kh, sh).unfold(3, kw, sw).permute(0, 1, 5, 6, 2, 3, 4)  # (R, C, kh, kw, oh, ow, B)
    else:  # the data: kh * kw slices, each a few contiguous blocks (2.5x faster than the unfold's copy)
        ends = (sh * (oh - 1) + 1, sw * (ow - 1) + 1)
        cols = torch.stack(
            [x[:, :, i : i + ends[0] : sh, j : j + ends[1] : sw] for i in range(kh) for j in range(kw)], 2
        )
    cols = cols.reshape(runs, c * kh * kw, oh * ow * n)
    wm = w.reshape(runs, o, c * kh * kw)
    y = torch.bmm(wm, cols) if b is None else torch.baddbmm(b.unsqueeze(2), wm, cols)
    return y.view(runs, o, oh, ow, n)


def _pool(short: str):
    def pool(a: dict) -> Tensor:
        x = a["self"]
        _rank(x, 5, short)
        runs, c, h, w, n = x.shape
        images = x.reshape(runs * c, h, w, n).permute(0, 3, 1, 2)  # (R * C, B, H, W), channels-last
        y = _FUNCTIONS[short]({**a, "self": images})
        return y.permute(0, 2, 3, 1).reshape(runs, c, y.shape[2], y.shape[3], n)

    return pool


def _flatten(a: dict) -> Tensor:
    x = a["self"]
    rank = x.dim() - 1  # the example's rank plus its batch dimension
    start, end = int(a.get("start_dim", 0)), int(a.get("end_dim", -1))
    if start != 1 or end not in (-1, rank - 1):
        raise ValueError("only flatten(1, -1) is batched here")
    return x.reshape(x.shape[0], -1, x.shape[-1])


_BATCHED = {
    "linear": _linear,
    "conv2d": _conv2d,
    "max_pool2d": _pool("max_pool2d"),
    "avg_pool2d": _pool("avg_pool2d"),
    "flatten": _flatten,
}


def run(program: Program, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """The outputs (R, outputs, B) of R runs: params (R, *shape) each, x (R, B, *example shape)."""
    env: dict[str, Tensor] = {program.input: x.movedim(1, -1).contiguous()}  # im2col reads runs of B
    for short, out, args in program.ops:
        a = {k: env[v] if kind == "t" else params[v] if kind == "p" else v for k, (kind, v) in args}
        env[out] = _BATCHED[short](a) if short in _BATCHED else _FUNCTIONS[short](a)
    y = env[program.output]
    _rank(y, 3, "the output")
    return y


def per_run_losses(kind: str, out: Tensor, y: Tensor, validation: bool = False) -> Tensor:
    """(R,) mean loss of each run: out (R, C|D, B) (run's layout), y (R, B) labels or (R, B, D).
    The training loss is training.loss_of's, the validation loss losses.val_loss's (cross-entropy
    in float64)."""
    if kind == "cross_entropy":
        if validation:
            return cross_entropy_terms(out.transpose(1, 2), y).mean(dim=1)
        return F.cross_entropy(out, y, reduction="none").mean(dim=1)
    return (out.transpose(1, 2) - y).square().mean(dim=(1, 2))


def grads_and_losses(
    program: Program, kind: str, params: Mapping[str, Tensor], x: Tensor, y: Tensor, create_graph: bool
) -> tuple[dict[str, Tensor], Tensor]:
    """Each run's training gradient and loss: ({name: (R, *shape)}, (R,)). With create_graph the
    gradients are differentiable (second order); parameters that do not require grad (a screen, or
    the first step) are differentiated as leaves of their own."""
    with torch.enable_grad():
        leaves = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in params.items()}
        losses = per_run_losses(kind, run(program, leaves, x), y)
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()), create_graph=create_graph)
    return dict(zip(leaves, grads, strict=True)), losses if create_graph else losses.detach()


def _pool_before_relu(program: Program) -> Program:
    """relu then max_pool2d, as max_pool2d then relu: the same values and the same gradients (relu
    is monotone, so the window's first maximum is the same element or the window is all <= 0,
    where both give a zero gradient), with the relu on the pooled, smaller tensor."""
    ops = list(program.ops)
    uses: dict[str, int] = {}
    for _short, _out, args in ops:
        for _k, (kind, v) in args:
            if kind == "t":
                uses[v] = uses.get(v, 0) + 1
    for i in range(len(ops) - 1):
        (s1, o1, a1), (s2, o2, a2) = ops[i], ops[i + 1]
        if s1 != "relu" or s2 != "max_pool2d" or dict(a2).get("self") != ("t", o1):
            continue
        if uses.get(o1) != 1 or o1 == program.output:
            continue
        pooled = tuple((k, dict(a1)["self"] if k == "self" else ref) for k, ref in a2)
        ops[i] = (s2, o1, pooled)
        ops[i + 1] = (s1, o2, (("self", ("t", o1)),))
    return Program(program.input, program.output, tuple(ops))


def program_of(model: nn.Module, example: Tensor) -> Program | None:
    """The model as a Program, or None when it is not a chain of known functions or does not give
    the module's own outputs on two runs of ``example`` (a few input rows; nothing is trained)."""
    if type(model) is nn.Sequential:
        program = _sequential_program(model)
    elif type(model) is ProgramModule:
        program = _exported_program(model)
    else:
        return None
    if program is None or any(True for _ in model.buffers()):
        return None
    program = _pool_before_relu(program)
    names = [n for n, _ in model.named_parameters()]
    if any(not p.requires_grad for p in model.parameters()):
        return None
    try:
        with torch.no_grad():
            want = model(example)
            params = {n: torch.stack([p, p * 0.5]) for n, p in model.named_parameters()}
            got = run(program, params, torch.stack([example, example])).transpose(1, 2)
            half = torch.func.functional_call(model, {n: params[n][1] for n in names}, (example,))
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError):  # any failure: not this path
        return None
    ok = got.shape == (2, *want.shape)
    ok = ok and torch.allclose(got[0], want, rtol=1e-4, atol=1e-5)
    ok = ok and torch.allclose(got[1], half, rtol=1e-4, atol=1e-5)
    return program if ok else None
