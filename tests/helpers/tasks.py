"""Small synthetic problems for engine tests (float64 by default, local RNG only)."""

import torch

from worker.engine import Task


def synthetic_task(
    loss: str = "cross_entropy",
    hidden: tuple[int, ...] = (8,),
    activation: str = "tanh",
    n: int = 48,
    n_val: int = 20,
    features: int = 5,
    out: int = 3,
    steps: int = 12,
    batch: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    name: str | None = None,
) -> Task:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n + n_val, features, generator=g, dtype=torch.float64)
    w = torch.randn(features, out, generator=g, dtype=torch.float64)
    signal = x @ w + 0.3 * torch.randn(n + n_val, out, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = signal.argmax(dim=1)
    else:
        y = signal.to(dtype)
    x = x.to(dtype)
    return Task(
        name=name or f"synthetic-{loss}-{seed}",
        x_train=x[:n],
        y_train=y[:n],
        x_val=x[n:],
        y_val=y[n:],
        hidden=hidden,
        activation=activation,
        loss=loss,
        out_features=out,
        steps=steps,
        batch_size=batch,
        seed=seed,
    )
