"""A 16-task job against a 1-task job through the service, for every model kind (issue 13, part 3).

    .venv/bin/python benchmarks/kinds_service.py                  # mlp, cnn, exported; 1 and 16 tasks
    .venv/bin/python benchmarks/kinds_service.py --kinds cnn --iterations 5

Each job is what a user would POST: n tasks on digits (split seeds 0..n-1, val_fraction 0.2), 100
steps of batch 32, cross-entropy, from lr 0.01 and momentum 0.5, ``--iterations`` meta-iterations.
mlp: builtin digits, hidden [32] tanh. cnn: the digits as (1, 8, 8) images (one uploaded .npz,
POST /v1/datasets), layers conv 8 k3, relu, maxpool 2, flatten, linear. exported: the same images and
the same network as a torch.export program (POST /v1/models). Every job goes through the real API
(FastAPI app, SQLite in a temporary folder) and the real runner (worker.runner.run_chunk, chunk
after chunk, in this process, one thread); the time is the whole job, including the final
evaluation by plain torch.optim.SGD on the held-out draws. One untimed 1-iteration job per kind
first warms the process up (the first torch.optim.SGD alone imports for seconds). The target: the
16-task job takes at most 4x the 1-task job for every kind.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CNN_LAYERS = [
    {"type": "conv2d", "out_channels": 8, "kernel_size": 3},
    {"type": "relu"},
    {"type": "maxpool", "kernel_size": 2},
    {"type": "flatten"},
    {"type": "linear"},
]


def _digits_npz() -> bytes:
    import numpy as np

    from worker.datasets import _load_raw

    data, target = _load_raw("digits")
    buf = io.BytesIO()
    np.savez(buf, x=data.astype(np.float32).reshape(-1, 1, 8, 8), y=target.astype(np.int64))
    return buf.getvalue()


def _cnn_pt2() -> bytes:
    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(72, 10))
    buf = io.BytesIO()
    torch.export.save(torch.export.export(net, (torch.zeros(32, 1, 8, 8),)), buf)
    return buf.getvalue()


def job(kind: str, n_tasks: int, iterations: int, dataset: str | None, model: str | None) -> dict:
    def task(seed: int) -> dict:
        if kind == "mlp":
            data = {"source": "builtin", "name": "digits", "val_fraction": 0.2, "seed": seed}
            spec: dict = {"kind": "mlp", "hidden": [32], "activation": "tanh"}
        else:
            train = {"dataset": dataset, "x": "x", "y": "y"}
            data = {"source": "dataset", "train": train, "val_fraction": 0.2, "seed": seed}
            spec = {"kind": "cnn", "layers": CNN_LAYERS} if kind == "cnn" else {"kind": "exported", "model": model}
        return {
            "name": f"split{seed}",
            "data": data,
            "model": spec,
            "loss": "cross_entropy",
            "steps": 100,
            "batch_size": 32,
        }

    return {
        "name": f"digits-{kind}-{n_tasks}",
        "tasks": [task(s) for s in range(n_tasks)],
        "hyperparameters": {"lr": 0.01, "momentum": 0.5},
        "meta": {"iterations": iterations, "seed": 0},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", nargs="+", default=["mlp", "cnn", "exported"])
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--iterations", type=int, default=10)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="gradtune-bench-")
    os.environ.update(GRADTUNE_DATA_DIR=tmp, GRADTUNE_TORCH_THREADS="1", GRADTUNE_ALLOWED_HOSTS="testserver")
    from fastapi.testclient import TestClient

    from service import keys
    from service.db.migrate import upgrade
    from service.main import create_app
    from service.settings import get_settings
    from worker import runner
    from worker.device import configure_process

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.resolved_database_url())
    configure_process()
    app = create_app(settings)
    with app.state.sessionmaker() as session:
        _row, key = keys.create_key(session, tenant="default", admin=False)
        session.commit()

    def run(client, spec) -> float:
        t0 = time.perf_counter()
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code in (200, 201, 202), r.text
        body = r.json()
        iteration = 0
        while body["status"] not in ("succeeded", "failed", "cancelled"):
            runner.run_chunk(body["id"], iteration, owner=f"bench-{body['id']}-{iteration}")
            body = client.get(f"/v1/jobs/{body['id']}").json()
            iteration = body["progress"]["iteration"]
        assert body["status"] == "succeeded", body
        return time.perf_counter() - t0

    rows = []
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        dataset = model = None
        if set(args.kinds) - {"mlp"}:
            r = client.post("/v1/datasets", files={"file": ("digits.npz", _digits_npz())})
            assert r.status_code == 201, r.text
            dataset = r.json()["id"]
        if "exported" in args.kinds:
            r = client.post("/v1/models", files={"file": ("cnn.pt2", _cnn_pt2())})
            assert r.status_code in (200, 201), r.text
            model = r.json()["id"]
        for kind in args.kinds:  # warm-up (imports, first optimizer, kernels): one short job, not timed
            run(client, job(kind, 1, 1, dataset, model))
        for kind in args.kinds:
            secs = {n: run(client, job(kind, n, args.iterations, dataset, model)) for n in args.tasks}
            for n in args.tasks:
                rows.append((kind, n, secs[n], secs[n] / secs[args.tasks[0]]))
                print(f"{kind:9s} tasks={n:3d} {secs[n]:8.1f} s  x{rows[-1][3]:.2f}", flush=True)
    print()
    print(f"digits through the service, {args.iterations} meta-iterations, 100 steps, batch 32, one thread")
    print("| kind     | tasks | job time s | vs 1 task |")
    print("|----------|------:|-----------:|----------:|")
    for kind, n, s, ratio in rows:
        print(f"| {kind:8s} | {n:5d} | {s:10.1f} | {ratio:8.2f}x |")


if __name__ == "__main__":
    main()
