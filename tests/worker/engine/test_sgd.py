"""Functional sgd_step against torch.optim.SGD itself, step by step, in float64."""

import pytest
import torch

from worker.engine import sgd_init, sgd_step


def _random_params(g):
    return {
        "0.weight": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "0.bias": torch.randn(4, generator=g, dtype=torch.float64),
        "2.weight": torch.randn(2, 4, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_sgd_step_matches_torch_optim_sgd(momentum, as_tensor):
    g = torch.Generator().manual_seed(0)
    lr = 0.07
    start = _random_params(g)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    opt = torch.optim.SGD(ref.values(), lr=lr, momentum=momentum)
    params = {k: v.clone() for k, v in start.items()}
    bufs = sgd_init(params)
    lr_arg = torch.tensor(lr, dtype=torch.float64) if as_tensor else lr
    mom_arg = torch.tensor(momentum, dtype=torch.float64) if as_tensor else momentum
    for _ in range(6):
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in start.items()}
        for k, p in ref.items():
            p.grad = grads[k].clone()
        opt.step()
        params, bufs = sgd_step(params, bufs, grads, lr_arg, mom_arg)
        for k in start:
            torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-14, atol=1e-14)
            if momentum:
                torch.testing.assert_close(bufs[k], opt.state[ref[k]]["momentum_buffer"], rtol=1e-14, atol=1e-14)


def test_sgd_step_first_step_sets_buffer_to_gradient_and_is_out_of_place():
    g = torch.Generator().manual_seed(1)
    params = _random_params(g)
    before = {k: v.clone() for k, v in params.items()}
    grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    bufs = sgd_init(params)
    new_params, new_bufs = sgd_step(params, bufs, grads, 0.1, 0.9)
    for k in params:
        assert torch.equal(new_bufs[k], grads[k])
        assert torch.equal(params[k], before[k])  # inputs untouched
        assert torch.equal(bufs[k], torch.zeros_like(bufs[k]))
        torch.testing.assert_close(new_params[k], before[k] - 0.1 * grads[k], rtol=0, atol=1e-15)


def test_sgd_step_is_differentiable_in_lr_and_momentum():
    g = torch.Generator().manual_seed(2)
    p = {"w": torch.randn(3, generator=g, dtype=torch.float64)}
    g1 = {"w": torch.randn(3, generator=g, dtype=torch.float64)}
    g2 = {"w": torch.randn(3, generator=g, dtype=torch.float64)}
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    mu = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    p1, b1 = sgd_step(p, sgd_init(p), g1, lr, mu)
    p2, _ = sgd_step(p1, b1, g2, lr, mu)
    dlr, dmu = torch.autograd.grad(p2["w"].sum(), (lr, mu))
    # p2 = p - lr*g1 - lr*(mu*g1 + g2)
    torch.testing.assert_close(dlr, -(g1["w"] + 0.8 * g1["w"] + g2["w"]).sum())
    torch.testing.assert_close(dmu, -(0.3 * g1["w"]).sum())
