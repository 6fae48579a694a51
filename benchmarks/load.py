"""Load: many clients a round, and many large updates aggregated in bounded memory.

Two measurements, each printed as a markdown table with the machine and the command:

1. ``clients``: a federation of ``--clients`` simulated clients (digits, the small MLP), every
   client sampled every round, on Flower's simulation engine; seconds per round after the first.
2. ``memory``: ``--n`` updates of ``--d`` float32 parameters aggregated by coordinate-wise rules
   that work in column chunks (``max_chunk_bytes``); each rule runs in a fresh subprocess so
   its peak resident memory (``ru_maxrss``) is its own; "extra" is the peak minus the stack.

Usage::

    python benchmarks/load.py clients --clients 200 --rounds 3
    python benchmarks/load.py memory --n 1000 --d 1000000 --rules mean,median,trimmed-mean
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

GIB = 1024**3


def machine() -> str:
    import torch

    return f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"


def bench_clients(args: argparse.Namespace) -> None:
    from simulations.harness import run_federation

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = run_federation({"num-clients": args.clients, "num-malicious": 0, "attack": "none",
                                  "aggregator": args.aggregator, "num-byzantine": 0, "rounds": args.rounds,
                                  "out": out})
        wall = time.perf_counter() - started
    rounds = summary["rounds"]
    later = [r["seconds"] for r in rounds[1:]] or [rounds[0]["seconds"]]
    print(f"\n| clients | rounds | accepted per round | first round (s) | later rounds (s, mean) | "
          f"aggregation (s, mean) | wall (s) | final accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.clients} | {len(rounds)} | {min(len(r['accepted']) for r in rounds)} | {rounds[0]['seconds']:.2f} | "
          f"{sum(later) / len(later):.2f} | {sum(r['aggregation_seconds'] for r in rounds) / len(rounds):.3f} | "
          f"{wall:.1f} | {summary['final_accuracy']:.4f} |")


def _one_rule(rule: str, n: int, d: int, chunk_mib: int) -> dict:
    """Run in a child process: build the stack, aggregate once, report peak memory."""
    import torch

    import aggregators

    torch.manual_seed(0)
    stack = torch.empty((n, d), dtype=torch.float32)
    for start in range(0, n, 50):  # fill in slices: no temporary as large as the stack
        stack[start:start + 50].normal_()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = {"max_chunk_bytes": chunk_mib * 2**20} if rule != "mean" else {}
    aggregator = aggregators.build(rule, num_byzantine=max(1, n // 10), **params)
    started = time.perf_counter()
    out = aggregator(stack)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert out.vector.shape == (d,) and bool(torch.isfinite(out.vector).all())
    return {"rule": rule, "seconds": seconds, "stack_gib": n * d * 4 / GIB, "peak_gib": peak / GIB,
            "extra_gib": (peak - base) / GIB}


def bench_memory(args: argparse.Namespace) -> None:
    rows = []
    for rule in args.rules.split(","):
        child = subprocess.run([sys.executable, __file__, "_one", rule, str(args.n), str(args.d), str(args.chunk_mib)],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"\n{args.n} updates x {args.d:,} float32 parameters ({rows[0]['stack_gib']:.2f} GiB stack), "
          f"max_chunk_bytes = {args.chunk_mib} MiB\n")
    print("| rule | seconds | peak RSS (GiB) | extra over the stack (GiB) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['rule']} | {row['seconds']:.2f} | {row['peak_gib']:.2f} | {row['extra_gib']:.2f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        rule, n, d, chunk = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(_one_rule(rule, n, d, chunk)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    clients = commands.add_parser("clients")
    clients.add_argument("--clients", type=int, default=200)
    clients.add_argument("--rounds", type=int, default=3)
    clients.add_argument("--aggregator", default="trimmed-mean")
    memory = commands.add_parser("memory")
    memory.add_argument("--n", type=int, default=1000)
    memory.add_argument("--d", type=int, default=1_000_000)
    memory.add_argument("--rules", default="mean,median,trimmed-mean")
    memory.add_argument("--chunk-mib", type=int, default=64)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"command: python benchmarks/load.py {' '.join(sys.argv[1:])}")
    bench_clients(args) if args.command == "clients" else bench_memory(args)


if __name__ == "__main__":
    main()
