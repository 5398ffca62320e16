"""Issue 2's acceptance check through the service itself: the job a user POSTs, against a grid.

    .venv/bin/python benchmarks/digits_service.py     # about 1 minute on 2 cores

The job body is exactly the one a user would submit (4 builtin digits tasks with split seeds 0..3,
mlp [32] tanh, cross_entropy, 100 steps, batch 32, from lr 0.01 and momentum 0.9, 40 iterations).
It goes through the real API (FastAPI app, SQLite in a temporary folder) and the real runner
(worker.runner.run_chunk, chunk after chunk, in this process), and the settings are read back from
GET /v1/jobs/{id}/settings. The grid (25 lr log-spaced over 1e-3..3 x 6 momenta) is scored on the
same tasks (runner.build_tasks of the same body: same splits and seeds) with the same function the
settings' evaluation uses (plain torch.optim.SGD on the held-out draws EVAL_DRAWS). Two more jobs,
the same body with "meta": {"search": "line", "iterations": 3 or 5}, show the quick search.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOB = {
    "name": "digits-mlp",
    "tasks": [
        {
            "name": f"split{seed}",
            "data": {"source": "builtin", "name": "digits", "val_fraction": 0.2, "seed": seed},
            "model": {"kind": "mlp", "hidden": [32], "activation": "tanh"},
            "loss": "cross_entropy",
            "steps": 100,
            "batch_size": 32,
        }
        for seed in range(4)
    ],
    "hyperparameters": {"lr": 0.01, "momentum": 0.9},
    "meta": {"iterations": 40, "seed": 0},
}
# the same job with the quick search (README: meta.search), 3 and 5 iterations
QUICK_JOBS = [
    {**JOB, "name": f"digits-mlp-line-{n}", "meta": {"iterations": n, "seed": 0, "search": "line"}} for n in (3, 5)
]


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="gradtune-bench-")
    os.environ.update(GRADTUNE_DATA_DIR=tmp, GRADTUNE_TORCH_THREADS="1")
    from fastapi.testclient import TestClient

    from benchmarks.digits_grid import MOMENTA, grid_search, lr_grid
    from service.db.migrate import upgrade
    from service.main import create_app
    from service.schemas import JobCreate
    from service.settings import get_settings
    from worker import engine, runner
    from worker.device import configure_process

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.resolved_database_url())
    configure_process()

    def run(client, spec):
        t0 = time.perf_counter()
        job = client.post("/v1/jobs", json=spec).json()
        iteration = 0
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            runner.run_chunk(job["id"], iteration, owner=f"bench-{job['id']}-{iteration}")
            job = client.get(f"/v1/jobs/{job['id']}").json()
            iteration = job["progress"]["iteration"]
        secs = time.perf_counter() - t0
        assert job["status"] == "succeeded", job
        return client.get(f"/v1/jobs/{job['id']}/settings").json(), secs

    with TestClient(create_app(settings)) as client:
        body, job_s = run(client, JOB)
        quick = [run(client, spec) for spec in QUICK_JOBS]
    tasks = runner.build_tasks(JobCreate.model_validate(JOB))
    g_lr, g_mom, g_loss, grid_s = grid_search(tasks, list(engine.EVAL_DRAWS), lr_grid(25))
    ev = body["evaluation"]
    rows = [
        (f"grid best ({25}x{len(MOMENTA)}, chosen on the evaluation draws)", g_lr, g_mom, g_loss, grid_s),
        (
            "start (the job's hyperparameters)",
            ev["initial"]["lr"],
            ev["initial"]["momentum"],
            ev["mean_initial_val_loss"],
            0.0,
        ),
        ("learned (GET /v1/jobs/{id}/settings)", body["lr"], body["momentum"], ev["mean_learned_val_loss"], job_s),
    ] + [
        (
            f"learned, quick: meta.search line, {spec['meta']['iterations']} iterations",
            q["lr"],
            q["momentum"],
            q["evaluation"]["mean_learned_val_loss"],
            q_s,
        )
        for spec, (q, q_s) in zip(QUICK_JOBS, quick, strict=True)
    ]
    print("digits through the service: 4 tasks, mlp [32] tanh, 100 steps, batch 32; scored on draws", ev["draws"])
    print(f"| {'settings':<52} | {'lr':>8} | {'momentum':>8} | {'val loss':>8} | {'ratio':>6} | {'time s':>6} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 8}|")
    for name, lr, mom, loss, secs in rows:
        print(f"| {name:<52} | {lr:>8.4g} | {mom:>8.4f} | {loss:>8.4f} | {loss / g_loss:>6.3f} | {secs:>6.1f} |")
    ratio = ev["mean_learned_val_loss"] / g_loss
    verdict = "met" if ratio <= 1.10 else "NOT met"
    print(f"target: learned within 10% of the grid's best -> ratio {ratio:.3f}: {verdict}")
    print(
        f"(time s: the whole job through API and runner, chunk by chunk; the grid: its "
        f"{25 * len(MOMENTA) * len(tasks) * len(ev['draws'])} trainings)"
    )


if __name__ == "__main__":
    main()
