"""Time the aggregation rules on a GPU, in reads of the stack (issue 8's GPU targets).

Usage (on a machine with CUDA; Flower need not be installed)::

    python benchmarks/gpu_reads.py --out docs/gpu.md            # n=100, d=11.2M float32
    python benchmarks/gpu_reads.py --sweep --out /tmp/gpu.md    # also the kernels' launch settings

One read is the fastest ``torch.sum(stack, dim=0, out=...)``: it streams the stack once, so a rule
that takes 10 reads costs ten passes over GPU memory. Every time is the minimum wall time of a
call and a synchronise, after a warm-up (which compiles the Triton kernels), over at least
``--repeats`` calls (``time_call`` of benchmarks/aggregation.py). For scale the
table also times ``torch.median(dim=0)`` and ``torch.sort(dim=0)``, the kernels a sort-based rule
would use.

Targets (issue 8, an H100 at n=100, d=11.2M): Krum, median and trimmed mean at most 10 reads,
Bulyan at most 40. Each rule's output on the first ``--check-columns`` columns is compared with
the CPU (numpy) kernel's: the column "max |diff| vs CPU". Each rule is timed at every
``--chunk-bytes`` value: by default the CPU default ``max_chunk_bytes`` (8 MiB, sized for caches)
and the CUDA default (256 MiB, since the torch paths for Krum's Gram matrix, distances and
weighted sums launch a few kernels per chunk of columns).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import aggregators  # noqa: E402
from aggregators import order_stats_triton  # noqa: E402
from aggregators.base import DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_CHUNK_BYTES_GPU  # noqa: E402
from benchmarks.aggregation import time_call  # noqa: E402

TARGET_READS = {"krum": 10, "median": 10, "trimmed-mean": 10, "bulyan": 40}


def cuda_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall seconds of ``fn()`` (synchronised) by benchmarks/aggregation.py's policy."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return time_call(fn, repeats, device)[0]


def make_stack(n: int, d: int, f: int, seed: int, device: torch.device) -> torch.Tensor:
    """Honest rows ``1 + 0.01 N(0, 1)``, f rows shifted by +10 (benchmarks/aggregation.py's input)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    stack = torch.randn((n, d), generator=generator, device=device, dtype=torch.float32).mul_(0.01).add_(1.0)
    stack[n - f :] += 10.0
    return stack


def rule_call(name: str, f: int, stack: torch.Tensor, max_chunk_bytes: Optional[int] = None) -> Callable[[], aggregators.AggregationResult]:
    params = {} if max_chunk_bytes is None else {"max_chunk_bytes": max_chunk_bytes}
    rule = aggregators.build(name, num_byzantine=f, **params)
    trusted = stack[: stack.shape[0] - f].mean(dim=0)

    def call() -> aggregators.AggregationResult:
        if getattr(rule, "needs_trusted_update", False):
            rule.set_trusted_update(trusted)  # consumed by each call, as the server does per round
        return rule(stack)

    return call


def cpu_difference(name: str, f: int, stack: torch.Tensor, columns: int) -> float:
    """Largest coordinate difference between the GPU and CPU kernels on the first columns."""
    part = stack[:, :columns].contiguous()
    gpu = rule_call(name, f, part)().vector.cpu().double()
    cpu = rule_call(name, f, part.cpu())().vector.double()
    return float((gpu - cpu).abs().max())


def sweep_rows(stack: torch.Tensor, f: int, read_s: float, repeats: int) -> List[str]:
    """Launch settings of the two selection kernels, in reads."""
    n, d = stack.shape
    vector = torch.empty(d, dtype=stack.dtype, device=stack.device)
    rows = []
    for block in (32, 64, 128, 256):
        for warps in (1, 2, 4, 8):
            kept = cuda_seconds(lambda: order_stats_triton.kept_mean(stack, f, n - f - 1, vector, False, block, warps), repeats)
            closest = cuda_seconds(lambda: order_stats_triton.closest_mean(stack, None, n - f, vector, block, warps), repeats)
            rows.append(f"| {block} | {warps} | {kept:.4f} | {kept / read_s:.1f} | {closest:.4f} | {closest / read_s:.1f} |")
            print(rows[-1], flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--d", type=float, default=11.2e6)
    parser.add_argument("--rules", default="all", help="comma list of rules, or 'all'")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-columns", type=int, default=200_000)
    parser.add_argument(
        "--chunk-bytes",
        default=f"{DEFAULT_MAX_CHUNK_BYTES},{DEFAULT_MAX_CHUNK_BYTES_GPU}",
        help="comma list of max_chunk_bytes to time each rule with (the CPU default, and the CUDA default that "
        "aggregators.base.chunk_budget picks: the torch paths launch a few kernels per chunk)",
    )
    parser.add_argument("--sweep", action="store_true", help="also time the selection kernels' launch settings")
    parser.add_argument("--smoke", action="store_true", help="allow a CPU run (with TRITON_INTERPRET=1 for --sweep)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "gpu.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_reads.py needs CUDA (--smoke runs it on CPU, small, to check the script)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, d, f = args.n, int(args.d), max(1, args.n // 10)
    stack = make_stack(n, d, f, args.seed, device)
    column_sums = torch.empty(d, dtype=stack.dtype, device=device)
    read_s = cuda_seconds(lambda: torch.sum(stack, dim=0, out=column_sums), args.repeats)
    gib = stack.numel() * stack.element_size() / 2**30
    print(f"one read of {gib:.2f} GiB: {read_s * 1e3:.3f} ms ({gib / read_s:.0f} GiB/s)", flush=True)

    names = aggregators.available() if args.rules == "all" else args.rules.split(",")
    chunk_sizes = [int(float(value)) for value in args.chunk_bytes.split(",")]
    table = []
    for name in names:
        diff = cpu_difference(name, f, stack, min(d, args.check_columns))
        target = TARGET_READS.get(name)
        for chunk in chunk_sizes:
            seconds = cuda_seconds(rule_call(name, f, stack, chunk), args.repeats)
            verdict = "" if target is None else (f"<= {target}: met" if seconds / read_s <= target else f"<= {target}: NOT met")
            table.append(f"| {name} | Phalanx | {chunk / 2**20:g} | {seconds:.4f} | {seconds / read_s:.1f} | {diff:.2e} | {verdict} |")
            print(table[-1], flush=True)
    for label, fn in (
        ("torch.median(dim=0)", lambda: torch.median(stack, dim=0)),
        ("torch.sort(dim=0)", lambda: torch.sort(stack, dim=0)),
    ):
        seconds = cuda_seconds(fn, args.repeats)
        table.append(f"| {label} | torch |  | {seconds:.4f} | {seconds / read_s:.1f} |  |  |")
        print(table[-1], flush=True)

    import triton

    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    where = f"{gpu.name}, {gpu.multi_processor_count} SMs" if gpu else f"CPU smoke run ({platform.processor() or platform.machine()})"
    lines = [
        "# GPU aggregation timings",
        "",
        "Generated by `benchmarks/gpu_reads.py`; rerun it to refresh this file.",
        "",
        f"- Command: `python benchmarks/gpu_reads.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Device: {where}; torch {torch.__version__}, triton {triton.__version__}, "
        f"Python {platform.python_version()}",
        f"- Input: float32 (n={n}, d={d:,}), f={f}; {gib:.2f} GiB; one read (`torch.sum(dim=0)`) {read_s * 1e3:.3f} ms",
        f"- Seconds: minimum wall time (synchronised) over >= {args.repeats} calls after a warm-up; "
        "reads = seconds / one read.",
        f"- max |diff| vs CPU: on the first {min(d, args.check_columns):,} columns, against the numpy kernels.",
        "",
        "| rule | implementation | max_chunk_bytes (MiB) | seconds | reads | max abs diff vs CPU | target |",
        "|---|---|---:|---:|---:|---:|---|",
        *table,
    ]
    if args.sweep:
        lines += [
            "",
            "## Launch settings of the selection kernels",
            "",
            f"`kept_mean` (trimmed mean, f={f}) and `closest_mean` (mean of the n - f values nearest the median).",
            "",
            "| columns per program | warps | kept_mean s | reads | closest_mean s | reads |",
            "|---:|---:|---:|---:|---:|---:|",
            *sweep_rows(stack, f, read_s, args.repeats),
        ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
