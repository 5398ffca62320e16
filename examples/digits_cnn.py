"""Tune SGD for a small CNN on scikit-learn's 8x8 digit images, then check the result yourself.

Start a server first (``gradtune serve``: API on :8000 with an embedded worker), then run:

    python examples/digits_cnn.py            # GRADTUNE_URL names another server

It builds the digits as (N, 1, 8, 8) image tensors, declares a small CNN, asks gradtune for the
learning rate and momentum of torch.optim.SGD (the client uploads the tensors, submits a job and
shows a progress bar), then trains the CNN twice with plain torch.optim.SGD from the same
initialization and the same mini-batches, once with the starting settings and once with the learned
ones, and prints both validation losses.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from gradtune import Client

URL = os.environ.get("GRADTUNE_URL", "http://localhost:8000")
STEPS, BATCH = 150, 32
START = {"lr": 0.01, "momentum": 0.9}  # what you would have used without tuning


def digits_images(val_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_val, y_val): images scaled to [0, 1] as (N, 1, 8, 8), int64 labels."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.tensor(np.random.default_rng(seed).permutation(len(x)))
    n_val = round(len(x) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8 x 4 x 4
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 2 x 2
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, x, y, x_val, y_val, lr: float, momentum: float, seed: int = 0) -> float:
    """Plain torch.optim.SGD for STEPS mini-batches (reshuffled each epoch, last partial batch
    dropped); returns the validation cross-entropy."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True, drop_last=True, generator=gen
    )
    step = 0
    while step < STEPS:
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == STEPS:
                break
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x_val), y_val))


def main() -> None:
    x, y, x_val, y_val = digits_images()
    torch.manual_seed(0)
    model = make_cnn()
    print(f"digits: {len(x)} training and {len(x_val)} validation images of shape {tuple(x.shape[1:])}")
    print(f"tuning SGD for {STEPS} steps of batch {BATCH} on {URL} ...")
    with Client(URL) as client:
        settings = client.tune(
            model,
            (x, y),
            (x_val, y_val),
            loss="cross_entropy",
            steps=STEPS,
            batch_size=BATCH,
            lr=START["lr"],
            momentum=START["momentum"],
            iterations=20,
            name="digits-cnn",
        )
    print(f"learned: lr={settings.lr:.4g} momentum={settings.momentum:.4g}")

    # the same initialization and the same batches for both runs: only the settings differ
    before = train(copy.deepcopy(model), x, y, x_val, y_val, START["lr"], START["momentum"])
    after = train(copy.deepcopy(model), x, y, x_val, y_val, settings.lr, settings.momentum)
    print(f"validation loss with the starting settings (lr={START['lr']}, momentum={START['momentum']}): {before:.4f}")
    learned = f"lr={settings.lr:.4g}, momentum={settings.momentum:.4g}"
    print(f"validation loss with the learned settings  ({learned}): {after:.4f}")
    ev = settings.evaluation
    if ev:
        print(
            f"(the server's own check on unseen draws: {ev['mean_initial_val_loss']:.4f} -> "
            f"{ev['mean_learned_val_loss']:.4f})"
        )


if __name__ == "__main__":
    main()
