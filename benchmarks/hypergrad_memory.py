"""Peak memory of one hypergradient against the number of unrolled steps K.

    pip install -e '.[bench]'
    .venv/bin/python benchmarks/hypergrad_memory.py                       # K = 10 ... 10,000
    .venv/bin/python benchmarks/hypergrad_memory.py --ks 10 100 1000      # quicker

Same problem as hypergrad_throughput.py, one task: MLP 64-32-10 tanh, batch 32, float32, builtin
digits, one thread. Every (implementation, K) runs in a fresh process, which reports its resident
memory once everything is prepared (torch imported, data loaded, weights and batch order built) and
its peak (VmHWM) after one hypergradient; "extra" is the difference: what the hypergradient itself
needed. Peers are skipped above --max-peer-k.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMPLS = ("gradtune reverse", "gradtune forward", "torchopt", "higher")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(key)


def one(impl: str, k: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    from benchmarks.digits_grid import digits_tasks
    from benchmarks.peers import Prepared, higher_hypergradient, torchopt_hypergradient
    from worker.engine.functional import Objective

    # a warm-up at K=2, so lazy initialisation inside torch is not counted as the hypergradient's
    for steps in (2, k):
        tasks = digits_tasks(n_tasks=1, steps=steps)
        if impl.startswith("gradtune"):
            obj = Objective(tasks, (0,))
            call = functools.partial(obj.value_and_grad, math.log(0.01), 0.0, (0.0, 0.999), impl.split()[1])
        else:
            p = Prepared(tasks[0], 0)
            fn = torchopt_hypergradient if impl == "torchopt" else higher_hypergradient
            call = functools.partial(fn, p, math.log(0.01), 0.5)
        if steps == k:
            base = _status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
                f.write("5")
        t0 = time.perf_counter()
        call()
        seconds = time.perf_counter() - t0
    print(json.dumps({"base_mb": base, "peak_mb": _status("VmHWM"), "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000, 10000])
    ap.add_argument("--max-peer-k", type=int, default=10000)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "K"))
    args = ap.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]))
        return
    results: dict[tuple[str, int], dict] = {}
    for k in args.ks:
        for impl in args.impls:
            if not impl.startswith("gradtune") and k > args.max_peer_k:
                continue
            out = subprocess.run(
                [sys.executable, "-W", "ignore", __file__, "--one", impl, str(k)],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                print(f"{impl} K={k}: failed\n{out.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["extra_mb"] = r["peak_mb"] - r["base_mb"]
            results[(impl, k)] = r
            print(
                f"{impl:17s} K={k:6d} base {r['base_mb']:7.1f} MB  peak {r['peak_mb']:7.1f} MB  "
                f"extra {r['extra_mb']:7.1f} MB  {r['seconds']:7.2f} s",
                flush=True,
            )
    print()
    print("| implementation    |      K | peak MB | extra MB | extra / extra at K=100 | time s |")
    print("|-------------------|-------:|--------:|---------:|-----------------------:|-------:|")
    for impl in args.impls:
        ref = results.get((impl, 100))
        for k in args.ks:
            r = results.get((impl, k))
            if r is None:
                continue
            # below 0.5 MB the ratio of two page-granular measurements means nothing
            ratio = f"{r['extra_mb'] / ref['extra_mb']:.2f}" if ref and ref["extra_mb"] >= 0.5 else "-"
            cells = f"{r['peak_mb']:7.1f} | {r['extra_mb']:8.2f} | {ratio:>22s} | {r['seconds']:6.2f}"
            print(f"| {impl:17s} | {k:6d} | {cells} |")
    fwd = [results.get(("gradtune forward", k)) for k in (100, 10000)]
    if all(fwd):
        print(f"\nforward peak at K=10000 / at K=100: {fwd[1]['peak_mb'] / fwd[0]['peak_mb']:.3f} (target <= 1.5)")


if __name__ == "__main__":
    main()
