"""Issue 10, item 11: load on `gradtune serve` (SQLite, server-less broker) against a bare FastAPI app.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/load.py            # a few minutes on 2 cores
    PYTHONPATH=$PWD .venv/bin/python benchmarks/load.py --jobs 50 --rounds 2 --seconds 2   # quick

Part 1: ``--clients`` (50) asyncio httpx clients submit ``--jobs`` (500) small jobs (one inline task,
mlp [4], 5 steps, 2 iterations) and poll GET /v1/jobs/{id} until each finishes. Checked: every job
succeeded with its two iterations, the history is gapless (1..iterations) with no iteration twice
(read from the SQLite file itself), chunks started == chunks committed (no chunk ran twice), and no
request got an HTTP error or a transport error.

Part 2: with one (longer) job running, 50 kept-alive connections (a bare asyncio HTTP/1.1 client:
httpx would be the bottleneck) poll GET /v1/jobs/{id} of that job, and then a bare FastAPI endpoint
returning a JSON body of the same shape and size, for ``--seconds`` each, alternating, ``--rounds``
times. The table gives requests per second and p50/p99 latency of each, and the ratios service /
bare (target: req/s ratio >= 0.8, p99 ratio <= 2).

Both servers are uvicorn with the same settings (one process, the ``gradtune serve`` config), on
free 127.0.0.1 ports, and both run their handler as a sync function in the thread pool as
FastAPI's sync routes do. The driver runs on the same machine, so it shares the CPUs with both.
Everything stops by itself: each phase has a deadline, and the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
TERMINAL = ("succeeded", "failed", "cancelled")

TASK = {
    "name": "t0",
    "data": {
        "source": "inline",
        "x_train": [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.5, 0.5], [0.2, 0.8]],
        "y_train": [1, 1, 0, 0, 2, 1],
        "x_val": [[0.9, 0.1], [0.1, 0.1]],
        "y_val": [1, 0],
    },
    "model": {"kind": "mlp", "hidden": [4], "activation": "tanh"},
    "loss": "cross_entropy",
    "steps": 5,
    "batch_size": 2,
}


def small_job(i: int) -> dict:
    return {
        "name": f"load-{i}",
        "tasks": [TASK],
        "hyperparameters": {"lr": 0.01, "momentum": 0.9},
        "meta": {"iterations": 2, "seed": i},
    }


# The job that runs while part 2 measures (another is submitted if it finishes; cancelled at the end).
LONG_JOB = {
    "name": "load-running",
    "tasks": [
        {
            "name": f"digits{seed}",
            "data": {"source": "builtin", "name": "digits", "val_fraction": 0.2, "seed": seed},
            "model": {"kind": "mlp", "hidden": [32], "activation": "tanh"},
            "loss": "cross_entropy",
            "steps": 100,
            "batch_size": 32,
        }
        for seed in range(4)
    ],
    "hyperparameters": {"lr": 0.01, "momentum": 0.9},
    "meta": {"iterations": 1000, "seed": 0},
}

# What the bare endpoint answers: a GET /v1/jobs/{id} body of a running job, same keys and sizes.
BARE_BODY = {
    "id": "0b6f3c1e-5d2a-4f7e-9c1b-2a3d4e5f6a7b",
    "name": "load-running",
    "status": "running",
    "progress": {"iteration": 12, "iterations": 1000, "meta_loss": 0.6931, "lr": 0.0123, "momentum": 0.9},
    "created_at": "2025-01-01T00:00:00.000000Z",
    "started_at": "2025-01-01T00:00:01.000000Z",
    "finished_at": None,
    "error": None,
    "cancel_requested": False,
    "stopped": None,
    "max_seconds": 3600.0,
    "elapsed_seconds": 12.5,
}


def bare_app():
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict:  # sync, like the service's handler: runs in the thread pool
        return {**BARE_BODY, "id": job_id}

    return app


def serve_bare(port: int) -> None:
    """The bare app under uvicorn with the config ``gradtune serve`` uses."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(bare_app(), host=HOST, port=port, timeout_graceful_shutdown=5)).run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(argv: list[str], env: dict, log: pathlib.Path) -> subprocess.Popen:
    out = open(log, "wb")
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


async def wait_up(client, url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before answering {url}")
        try:
            if (await client.get(url)).status_code < 500:
                return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


class Counts:
    def __init__(self) -> None:
        self.requests = 0
        self.errors: list[str] = []

    def error(self, what: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(what)
        else:
            self.errors[-1] = f"... and more (last: {what})"


async def request(client, counts: Counts, method: str, url: str, **kw):
    counts.requests += 1
    try:
        r = await client.request(method, url, **kw)
    except Exception as exc:  # a transport error is an error too
        counts.error(f"{method} {url}: {type(exc).__name__}: {exc}")
        return None
    if r.status_code >= 400:
        counts.error(f"{method} {url}: {r.status_code} {r.text[:200]}")
        return None
    return r.json()


async def submit_and_poll(
    client, base: str, jobs: list[int], counts: Counts, done: dict, deadline: float, poll: float
) -> None:
    while jobs:
        i = jobs.pop()
        body = await request(client, counts, "POST", f"{base}/v1/jobs", json=small_job(i))
        if body is None:
            continue
        job_id = body["id"]
        while body["status"] not in TERMINAL and time.monotonic() < deadline:
            await asyncio.sleep(poll)
            body = await request(client, counts, "GET", f"{base}/v1/jobs/{job_id}") or body
        done[job_id] = body


def check_database(db: pathlib.Path, ids: list[str]) -> list[str]:
    """Problems seen in the SQLite file: a job not succeeded once, a gap or a repeat in a history."""
    problems = []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        for job_id in ids:
            row = con.execute(
                "SELECT status, iteration, iterations, chunks_started, chunks_committed FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
            its = [r[0] for r in con.execute("SELECT iteration FROM job_iterations WHERE job_id = ?", (job_id,))]
            status, iteration, iterations, started, committed = row
            if status != "succeeded" or iteration != iterations:
                problems.append(f"{job_id}: {status} at {iteration}/{iterations}")
            if sorted(its) != list(range(1, iterations + 1)):
                problems.append(f"{job_id}: history iterations {sorted(its)}")
            if started != committed:
                problems.append(f"{job_id}: {started} chunks started, {committed} committed")
    finally:
        con.close()
    return problems


async def part1(client, base: str, args, db: pathlib.Path) -> bool:
    counts, done = Counts(), {}
    jobs = list(range(args.jobs))[::-1]
    deadline = time.monotonic() + args.timeout
    t0 = time.perf_counter()
    await asyncio.gather(
        *(submit_and_poll(client, base, jobs, counts, done, deadline, args.poll) for _ in range(args.clients))
    )
    secs = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    for body in done.values():
        statuses[body["status"]] = statuses.get(body["status"], 0) + 1
    for job_id in done:  # the history through the API as well: 1..iterations, once each
        hist = await request(client, counts, "GET", f"{base}/v1/jobs/{job_id}/history")
        if hist is not None and [it["iteration"] for it in hist["items"]] != list(range(1, 3)):
            counts.error(f"{job_id}: API history {[it['iteration'] for it in hist['items']]}")
    problems = check_database(db, list(done))
    print(f"Part 1: {args.clients} clients, {args.jobs} jobs in {secs:.1f} s ({args.jobs / secs:.1f} jobs/s)")
    print(f"  statuses: {statuses}; jobs seen: {len(done)}; requests: {counts.requests}; errors: {len(counts.errors)}")
    print(f"  database problems (not succeeded once, history gaps or repeats, chunks redone): {len(problems)}")
    for line in (counts.errors + problems)[:20]:
        print(f"    {line}")
    return len(done) == args.jobs and statuses == {"succeeded": args.jobs} and not counts.errors and not problems


async def raw_get(reader, writer, host: str, path: str, key: str) -> tuple[int, bytes]:
    """One GET on a kept-alive HTTP/1.1 connection: the status and the body (Content-Length framed).
    Both servers get the API key (the bare one ignores it)."""
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nAuthorization: Bearer {key}\r\n"
    writer.write((head + "\r\n").encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(h.split(":", 1)[1]) for h in lines if h.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def hammer(url: str, seconds: float, clients: int, counts: Counts, key: str) -> tuple[int, list[float], float]:
    """``clients`` kept-alive connections GET ``url`` in a loop for ``seconds``: a bare asyncio client
    (a small fraction of httpx's CPU per request), so that the servers, not the driver, set the pace."""
    lat: list[float] = []
    end = time.perf_counter() + seconds
    split = urlsplit(url)
    host, port, path = split.hostname or HOST, split.port or 80, split.path

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < end:
                t = time.perf_counter()
                counts.requests += 1
                status, body = await raw_get(reader, writer, f"{host}:{port}", path, key)
                if status >= 400:
                    counts.error(f"GET {url}: {status} {body[:200]!r}")
                else:
                    lat.append(time.perf_counter() - t)
        except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration) as exc:
            counts.error(f"GET {url}: {type(exc).__name__}: {exc}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    return len(lat), lat, time.perf_counter() - t0


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else float("nan")


async def running_job(client, base: str, counts: Counts, job: dict | None) -> dict | None:
    """``job`` if it is still running, else a new LONG_JOB once a worker has started it."""
    if job is not None:
        job = await request(client, counts, "GET", f"{base}/v1/jobs/{job['id']}") or job
        if job["status"] == "running":
            return job
    job = await request(client, counts, "POST", f"{base}/v1/jobs", json=LONG_JOB)
    deadline = time.monotonic() + 120
    while job is not None and job["status"] != "running" and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        job = await request(client, counts, "GET", f"{base}/v1/jobs/{job['id']}") or job
    return job if job is not None and job["status"] == "running" else None


async def part2(client, base: str, bare: str, args) -> bool:
    counts = Counts()
    rows, jobs_used = [], set()
    job = None
    for r in range(args.rounds + 1):  # round 0 warms both servers up and is not counted
        job = await running_job(client, base, counts, job)
        if job is None:
            print(f"Part 2: no job could be kept running: {counts.errors}")
            return False
        jobs_used.add(job["id"])
        targets = {"service": f"{base}/v1/jobs/{job['id']}", "bare": f"{bare}/v1/jobs/{job['id']}"}
        got = {}
        for name in ("service", "bare") if r % 2 == 0 else ("bare", "service"):
            n, lat, secs = await hammer(targets[name], args.seconds if r else 1.0, args.clients, counts, args.key)
            got[name] = (n / secs, p(lat, 0.5) * 1000, p(lat, 0.99) * 1000)
        if r:
            rows.append(got)
    still = await request(client, counts, "GET", f"{base}/v1/jobs/{job['id']}")
    if still is not None and still["status"] not in TERMINAL:
        await request(client, counts, "POST", f"{base}/v1/jobs/{job['id']}/cancel")
    print(
        f"\nPart 2: {args.clients} clients poll a running job's status ({len(jobs_used)} long job(s) kept one running)"
    )
    print(
        f"  {args.rounds} rounds of {args.seconds:g} s per server, alternating which goes first; errors: "
        f"{len(counts.errors)}\n"
    )
    print(
        "| round | service req/s | bare req/s | ratio req/s | service p50 ms | bare p50 ms "
        "| service p99 ms | bare p99 ms | ratio p99 |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, g in enumerate(rows, 1):
        (sr, s50, s99), (br, b50, b99) = g["service"], g["bare"]
        cells = (i, f"{sr:.0f}", f"{br:.0f}", f"{sr / br:.2f}", f"{s50:.1f}", f"{b50:.1f}", f"{s99:.1f}", f"{b99:.1f}")
        print("| " + " | ".join(map(str, cells)) + f" | {s99 / b99:.2f} |")
    med = [statistics.median(g[k][j] for g in rows) for k in ("service", "bare") for j in range(3)]
    ratio_rps = statistics.median(g["service"][0] / g["bare"][0] for g in rows)
    ratio_p99 = statistics.median(g["service"][2] / g["bare"][2] for g in rows)
    print(
        f"| median | {med[0]:.0f} | {med[3]:.0f} | {ratio_rps:.2f} | {med[1]:.1f} | {med[4]:.1f} "
        f"| {med[2]:.1f} | {med[5]:.1f} | {ratio_p99:.2f} |"
    )
    print("(the median row's ratios are the medians of the rounds' ratios: each round pairs two adjacent runs)")
    met = ratio_rps >= 0.8 and ratio_p99 <= 2.0
    print(f"\ntarget (req/s ratio >= 0.8, p99 ratio <= 2): {'met' if met else 'MISSED'}")
    for line in counts.errors[:10]:
        print(f"    {line}")
    return not counts.errors


async def drive(args, base: str, bare: str, procs, db: pathlib.Path) -> bool:
    import httpx

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
        await wait_up(client, f"{base}/healthz", procs[0])
        # the admin key serve wrote on its first start: every request carries it, as a client's would
        args.key = (db.parent / "admin.key").read_text().strip()
        client.headers["Authorization"] = f"Bearer {args.key}"
        await wait_up(client, f"{bare}/v1/jobs/x", procs[1])
        ok = True
        if args.jobs:
            ok = await part1(client, base, args, db)
        if args.rounds:
            ok = await part2(client, base, bare, args) and ok
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2, help="embedded workers of gradtune serve")
    ap.add_argument("--poll", type=float, default=0.25, help="seconds between two polls of one job")
    ap.add_argument("--timeout", type=float, default=900.0, help="deadline of part 1 in seconds")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of one measurement")
    ap.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        serve_bare(args.bare_server)
        return 0
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="gradtune-load-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GRADTUNE_DATA_DIR": str(tmp),
        "GRADTUNE_DATABASE_URL": "",
        "GRADTUNE_BROKER_URL": "",
        "GRADTUNE_TORCH_THREADS": "1",
        "GRADTUNE_TENANT_MAX_ACTIVE_JOBS": "100000",  # 500 jobs of one tenant at once
    }
    port, bare_port = free_port(), free_port()
    cli = "import sys; from gradtune.cli import cli; sys.argv[0] = 'gradtune'; cli()"
    serve_argv = [sys.executable, "-c", cli, "serve", "--host", HOST, "--port", str(port)]
    procs = [
        start([*serve_argv, "--workers", str(args.workers)], env, tmp / "serve.log"),
        start([sys.executable, __file__, "--bare-server", str(bare_port)], env, tmp / "bare.log"),
    ]
    print(
        f"gradtune serve on {HOST}:{port} ({args.workers} workers), bare FastAPI on {HOST}:{bare_port}; logs in {tmp}"
    )
    try:
        ok = asyncio.run(drive(args, f"http://{HOST}:{port}", f"http://{HOST}:{bare_port}", procs, tmp / "gradtune.db"))
    finally:
        for proc in procs:
            stop(proc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
