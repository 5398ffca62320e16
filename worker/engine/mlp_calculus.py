"""The batched MLP's hand-written calculus: activations and their derivatives, the training
gradients of a stack of runs (backprop through an MLP, batched over runs), their forward-mode
tangents, and validation losses. functional.py drives these through the unroll.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import cross_entropy_terms

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# --------------------------------------------------------------------------- batched MLP


def _activate(name: str, z: Tensor) -> Tensor:
    if name == "tanh":
        return torch.tanh(z)
    if name == "relu":
        return torch.relu(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    return F.gelu(z)


def _activate_backward(name: str, dh: Tensor, z: Tensor, a: Tensor) -> Tensor:
    """dL/dz from dL/da, written with differentiable ops (so the unroll can be differentiated)."""
    if name == "tanh":  # 1 - a^2
        return torch.addcmul(dh, dh * a, a, value=-1.0)
    if name == "sigmoid":  # a (1 - a)
        t = dh * a
        return torch.addcmul(t, t, a, value=-1.0)
    if name == "relu":
        return dh * (z > 0).to(dh.dtype)
    # exact (erf) GELU, as nn.GELU(): Phi(z) + z phi(z)
    cdf = 0.5 * (1.0 + torch.erf(z * _SQRT_HALF))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return dh * torch.addcmul(cdf, z, pdf)


def _layer_names(n_layers: int) -> list[tuple[str, str]]:
    return [(f"{2 * i}.weight", f"{2 * i}.bias") for i in range(n_layers)]


def _train_grads(params: dict[str, Tensor], names, xb: Tensor, yb: Tensor, act: str, loss: str) -> dict[str, Tensor]:
    """Gradients of the mean mini-batch loss for R stacked runs, by hand-written backprop.

    params: weights (R, out, in), biases (R, 1, out); xb (R, B, F); yb: one-hot (R, B, C) for
    cross_entropy, targets (R, B, D) for mse.
    """
    n_layers = len(names)
    inputs: list[Tensor] = []
    pre: list[Tensor] = []
    h = xb
    for i, (wn, bn) in enumerate(names):
        inputs.append(h)
        z = torch.baddbmm(params[bn], h, params[wn].transpose(1, 2))
        if i < n_layers - 1:
            pre.append(z)
            h = _activate(act, z)
        else:
            h = z
    out = h
    if loss == "cross_entropy":
        delta = (torch.softmax(out, dim=-1) - yb) * (1.0 / out.shape[1])
    else:
        delta = (out - yb) * (2.0 / (out.shape[1] * out.shape[2]))
    grads: dict[str, Tensor] = {}
    for i in range(n_layers - 1, -1, -1):
        wn, bn = names[i]
        grads[wn] = torch.bmm(delta.transpose(1, 2), inputs[i])
        grads[bn] = delta.sum(dim=1, keepdim=True)
        if i > 0:
            dh = torch.bmm(delta, params[wn])
            delta = _activate_backward(act, dh, pre[i - 1], inputs[i])
    return grads


def _activation_slopes(name: str, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor | None]:
    """(act'(z), act''(z)); None for a zero second derivative (relu)."""
    if name == "tanh":
        s1 = 1.0 - a * a
        return s1, -2.0 * a * s1
    if name == "sigmoid":
        s1 = a * (1.0 - a)
        return s1, s1 * (1.0 - 2.0 * a)
    if name == "relu":
        return (z > 0).to(z.dtype), None
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    cdf = 0.5 * (1.0 + torch.erf(z * _SQRT_HALF))
    return cdf + z * pdf, pdf * (2.0 - z * z)


def _forward_tangents(params, dparams, names, x: Tensor, act: str):
    """MLP forward for R runs with H tangents of the weights: inputs, pre-activations, output and
    their tangents (dh: (H, R, rows, width); None for the data, which has no tangent)."""
    n_layers = len(names)
    inputs, dinputs, pre, dpre = [], [], [], []
    h, dh = x, None
    for i, (wn, bn) in enumerate(names):
        w, dw = params[wn], dparams[wn]
        inputs.append(h)
        dinputs.append(dh)
        if h.shape[0] != w.shape[0]:
            h = h.expand(w.shape[0], *h.shape[-2:])
        z = torch.baddbmm(params[bn], h, w.transpose(1, 2))
        dz = dparams[bn] + torch.matmul(h, dw.transpose(-1, -2))
        if dh is not None:
            dz = dz + torch.matmul(dh, w.transpose(1, 2))
        if i < n_layers - 1:
            pre.append(z)
            dpre.append(dz)
            h = _activate(act, z)
            s1, _ = _activation_slopes(act, z, h)
            dh = dz * s1
        else:
            h, dh = z, dz
    return inputs, dinputs, pre, dpre, h, dh


def _train_grads_and_tangents(params, dparams, names, xb: Tensor, yb: Tensor, act: str, loss: str):
    """_train_grads and its directional derivatives along H weight tangents (Hessian-vector
    products of the mini-batch loss), written out by hand: grads (R, ...), dgrads (H, R, ...)."""
    n_layers = len(names)
    inputs, dinputs, pre, dpre, out, dout = _forward_tangents(params, dparams, names, xb, act)
    rows = out.shape[1]
    if loss == "cross_entropy":
        prob = torch.softmax(out, dim=-1)
        delta = (prob - yb) * (1.0 / rows)
        ddelta = prob * (dout - (prob * dout).sum(dim=-1, keepdim=True)) * (1.0 / rows)
    else:
        scale = 2.0 / (rows * out.shape[2])
        delta = (out - yb) * scale
        ddelta = dout * scale
    grads: dict[str, Tensor] = {}
    dgrads: dict[str, Tensor] = {}
    for i in range(n_layers - 1, -1, -1):
        wn, bn = names[i]
        h, dh = inputs[i], dinputs[i]
        grads[wn] = torch.bmm(delta.transpose(1, 2), h)
        dg = torch.matmul(ddelta.transpose(-1, -2), h)
        if dh is not None:
            dg = dg + torch.matmul(delta.transpose(1, 2), dh)
        dgrads[wn] = dg
        grads[bn] = delta.sum(dim=1, keepdim=True)
        dgrads[bn] = ddelta.sum(dim=-2, keepdim=True)
        if i > 0:
            w, dw = params[wn], dparams[wn]
            back = torch.bmm(delta, w)
            dback = torch.matmul(ddelta, w) + torch.matmul(delta, dw)
            z, dz = pre[i - 1], dpre[i - 1]
            s1, s2 = _activation_slopes(act, z, inputs[i])
            delta_new = _activate_backward(act, back, z, inputs[i])
            ddelta = dback * s1
            if s2 is not None:
                ddelta = ddelta + back * s2 * dz
            delta = delta_new
    return grads, dgrads


def _val_losses_and_tangents(params, dparams, names, x: Tensor, y: Tensor, act: str, loss: str):
    """_val_losses (R,) and their directional derivatives (H, R) along the weight tangents."""
    *_, out, dout = _forward_tangents(params, dparams, names, x, act)
    if loss == "cross_entropy":
        value = cross_entropy_terms(out, y.unsqueeze(0).expand(out.shape[0], -1)).mean(dim=1)
        resid = torch.softmax(out, dim=-1) - F.one_hot(y, out.shape[-1]).to(out.dtype)
        return value, (resid * dout).sum(dim=-1).mean(dim=-1)
    value = (out - y).square().mean(dim=(1, 2))
    return value, (2.0 * (out - y) * dout).mean(dim=(-2, -1))


def _val_losses(params: dict[str, Tensor], names, x: Tensor, y: Tensor, act: str, loss: str) -> Tensor:
    """Per-run mean validation loss (R,), for R stacked runs that share one validation set
    (cross-entropy in float64, losses.cross_entropy_terms)."""
    h = x
    for i, (wn, bn) in enumerate(names):
        runs = params[wn].shape[0]
        h = torch.baddbmm(params[bn], h.expand(runs, *h.shape[-2:]), params[wn].transpose(1, 2))
        if i < len(names) - 1:
            h = _activate(act, h)
    if loss == "cross_entropy":
        return cross_entropy_terms(h, y.unsqueeze(0).expand(h.shape[0], -1)).mean(dim=1)
    return (h - y).square().mean(dim=(1, 2))
