"""Load: many clients a round, and many large updates aggregated in bounded memory.

Two measurements, each printed as a markdown table with the machine and the command:

1. ``clients``: a federation of ``--clients`` simulated clients (digits, the small MLP), every
   client sampled every round, on Flower's simulation engine; seconds per round after the first.
2. ``memory``: ``--n`` updates of ``--d`` float32 parameters aggregated by coordinate-wise rules
   that work in column chunks (``max_chunk_bytes``); each rule runs in a fresh subprocess so
   its peak resident memory (``ru_maxrss``) is its own; "extra" is the peak minus the stack.
   With ``--stack-dir DIR`` the stack lives in a file-backed memory map there instead of RAM, so
   stacks larger than the machine's memory (1,000 x 10M float32 = 37 GiB) can be aggregated; the
   extra memory is then the peak of the process's anonymous memory (``RssAnon``, sampled every
   2 ms) over its value before the call: what the rule allocates, not the page cache of the file.

Usage::

    python benchmarks/load.py clients --clients 200 --rounds 3
    python benchmarks/load.py memory --n 1000 --d 1000000 --rules mean,median,trimmed-mean
    python benchmarks/load.py memory --n 1000 --d 10000000 --rules mean,median,trimmed-mean --stack-dir /var/tmp
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
import threading
import time
import warnings
from pathlib import Path

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
                                  "pre-aggregation": "", "server-momentum": 0.0, "out": out})
        wall = time.perf_counter() - started
    rounds = summary["rounds"]
    later = [r["seconds"] for r in rounds[1:]] or [rounds[0]["seconds"]]
    print("\n| clients | rounds | accepted per round | first round (s) | later rounds (s, mean) | "
          "aggregation (s, mean) | wall (s) | final accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.clients} | {len(rounds)} | {min(len(r['accepted']) for r in rounds)} | {rounds[0]['seconds']:.2f} | "
          f"{sum(later) / len(later):.2f} | {sum(r['aggregation_seconds'] for r in rounds) / len(rounds):.3f} | "
          f"{wall:.1f} | {summary['final_accuracy']:.4f} |")


def _fill_rows(stack, n: int) -> None:
    """Standard-normal rows, 50 at a time: no temporary as large as the stack."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for start in range(0, n, 50):
        stack[start:start + 50].normal_(generator=generator)


def _write_stack_file(path: Path, n: int, d: int) -> None:
    """Write the (n, d) float32 stack to ``path`` (a raw memory-mapped file)."""
    import numpy as np
    import torch

    mapped = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    _fill_rows(torch.from_numpy(mapped), n)
    mapped.flush()
    del mapped


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line (Linux only)")


class _AnonPeak:
    """The highest ``RssAnon`` seen while the ``with`` block runs, sampled every 2 ms."""

    def __enter__(self) -> "_AnonPeak":
        self.base = self.peak = _rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_anon_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon_bytes())


def _one_rule(rule: str, n: int, d: int, chunk_mib: int, stack_file: str = "") -> dict:
    """Run in a child process: build or map the stack, aggregate once, report peak memory."""
    import numpy as np
    import torch

    import aggregators

    if stack_file:
        # Read-only mapping (a private writable one larger than RAM is refused by the kernel's
        # overcommit check): a rule that wrote into its input would crash here, not pass.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            stack = torch.from_numpy(np.memmap(stack_file, dtype=np.float32, mode="r", shape=(n, d)))
    else:
        stack = torch.empty((n, d), dtype=torch.float32)
        _fill_rows(stack, n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = {"max_chunk_bytes": chunk_mib * 2**20} if rule != "mean" else {}
    aggregator = aggregators.build(rule, num_byzantine=max(1, n // 10), **params)
    with _AnonPeak() as anon:
        started = time.perf_counter()
        out = aggregator(stack)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert out.vector.shape == (d,) and bool(torch.isfinite(out.vector).all())
    extra = anon.peak - anon.base if stack_file else peak - base
    return {"rule": rule, "seconds": seconds, "stack_gib": n * d * 4 / GIB, "peak_gib": peak / GIB,
            "extra_gib": extra / GIB}


def bench_memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.stack_dir or None) as scratch:
        stack_file = ""
        if args.stack_dir:
            stack_file = str(Path(scratch) / "stack.f32")
            started = time.perf_counter()
            _write_stack_file(Path(stack_file), args.n, args.d)
            print(f"wrote the stack to {stack_file} in {time.perf_counter() - started:.0f} s")
        rows = []
        for rule in args.rules.split(","):
            child = subprocess.run([sys.executable, __file__, "_one", rule, str(args.n), str(args.d),
                                    str(args.chunk_mib), stack_file], capture_output=True, text=True)
            if child.returncode != 0:
                raise SystemExit(f"{rule} failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    where = f"memory-mapped from a file in {args.stack_dir}" if args.stack_dir else "in RAM"
    extra = "peak anonymous memory over its value before the call" if args.stack_dir else "peak RSS minus the stack"
    print(f"\n{args.n} updates x {args.d:,} float32 parameters ({rows[0]['stack_gib']:.2f} GiB stack, {where}), "
          f"max_chunk_bytes = {args.chunk_mib} MiB; extra = {extra}\n")
    print("| rule | seconds | peak RSS (GiB) | extra (GiB) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['rule']} | {row['seconds']:.2f} | {row['peak_gib']:.2f} | {row['extra_gib']:.2f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        rule, n, d, chunk = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(_one_rule(rule, n, d, chunk, sys.argv[6] if len(sys.argv) > 6 else "")))
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
    memory.add_argument("--stack-dir", default="",
                        help="keep the stack in a memory-mapped file in this folder (for stacks larger than RAM)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"command: python benchmarks/load.py {' '.join(sys.argv[1:])}")
    bench_clients(args) if args.command == "clients" else bench_memory(args)


if __name__ == "__main__":
    main()
