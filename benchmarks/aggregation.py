"""Time every Phalanx aggregation rule against Flower 1.42's kernels on the same inputs.

Usage::

    python benchmarks/aggregation.py                       # n in {20, 50}, d in {1e5, 1e6}, CPU
    python benchmarks/aggregation.py --n 50,100 --d 10000000 --device cuda --out /tmp/bench.md

Inputs: a fixed-seed float32 stack of n rows, n - f honest rows ``1 + 0.01 * N(0, 1)`` (model-like
values that differ by little) and f rows shifted by +10 (a crude attack), f = max(1, n // 10).

Compared kernels (each on the same stack, already in memory):

- Flower message API (``flwr.serverapp.strategy``): ``select_multikrum`` (Krum: m=1; MultiKrum:
  m=n-f, then the mean of the selected rows), FedMedian's ``np.median(stack, axis=0)``,
  FedTrimmedAvg's ``trim_mean(stack, beta)``, Bulyan's ``select_multikrum`` + median +
  ``aggregate_n_closest_weights``. The message-API Krum kernels take ArrayRecords and decode them.
- Flower legacy (``flwr.server.strategy.aggregate``): ``aggregate_krum``, ``aggregate_median``,
  ``aggregate_trimmed_avg``, ``aggregate_bulyan`` (skipped when its projected time exceeds
  ``--flower-budget-s``).
- A numpy reference trimmed mean: ``np.sort(stack, axis=0)[f:n-f].mean(axis=0)``.

Every timing is the minimum over at least ``--repeats`` calls (more for fast kernels, until 0.5 s
was spent) after one warm-up call: the minimum, because the machine may be shared and slower calls
measure other processes. Kernels slower than 2 s a call are timed once. The column "max |diff|" is the largest coordinate difference from Phalanx's output.

Then two CPU studies at the largest n and d: how to get per-coordinate order statistics (kernels,
chunk sizes, threads) and Krum's pairwise distances (time and worst relative error).

Writes a markdown table (with the machine description, the load average and the command) to
``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence


def _threads_from_argv(argv: Sequence[str]) -> Optional[str]:
    """``--threads N`` must act before numpy/torch load their thread pools, so read it early."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None


_THREADS = _threads_from_argv(sys.argv[1:]) if __name__ == "__main__" else None
if _THREADS is not None:
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = _THREADS

import numpy as np  # noqa: E402
import torch  # noqa: E402

if _THREADS is not None:
    torch.set_num_threads(int(_THREADS))

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import aggregators  # noqa: E402

SLOW_CALL_S = 2.0
MIN_TOTAL_S = 0.5
MAX_CALLS = 20


@dataclass
class Timing:
    """One measured kernel."""

    n: int
    d: int
    rule: str
    implementation: str
    seconds: Optional[float]
    max_abs_diff: Optional[float] = None
    note: str = ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Minimum wall time after a warm-up call.

    At least ``repeats`` timed calls, and more (up to ``MAX_CALLS``) until ``MIN_TOTAL_S`` has been
    spent, so that fast kernels get enough samples on a loaded machine; kernels slower than
    ``SLOW_CALL_S`` are timed once (the warm-up).
    """
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    first = time.perf_counter() - start
    if first > SLOW_CALL_S:
        return first, result
    best, spent, calls = float("inf"), 0.0, 0
    while calls < repeats or (spent < MIN_TOTAL_S and calls < MAX_CALLS):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best, result


def make_stack(n: int, d: int, f: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    stack = (1.0 + 0.01 * rng.standard_normal((n, d), dtype=np.float32)).astype(np.float32)
    stack[n - f :] += 10.0
    return stack


def phalanx_timings(stack: np.ndarray, f: int, rules: Sequence[str], repeats: int, device: torch.device) -> tuple[List[Timing], dict]:
    n, d = stack.shape
    updates = torch.from_numpy(stack).to(device)
    trusted = updates[: n - f].mean(dim=0)
    timings, outputs = [], {}
    for name in rules:
        rule = aggregators.build(name, num_byzantine=f)

        def call(rule=rule) -> aggregators.AggregationResult:
            if getattr(rule, "needs_trusted_update", False):
                rule.set_trusted_update(trusted)
            return rule(updates)

        seconds, result = time_call(call, repeats, device)
        outputs[name] = result.vector.detach().cpu().numpy()
        timings.append(Timing(n, d, name, "Phalanx", seconds))
        print(f"  n={n} d={d} {name:18s} Phalanx {seconds:8.4f} s", flush=True)
    return timings, outputs


def flower_timings(stack: np.ndarray, f: int, repeats: int, budget_s: float, outputs: dict) -> List[Timing]:
    """Flower 1.42's kernels on the same stack (numpy, CPU)."""
    warnings.filterwarnings("ignore")
    from flwr.app import ArrayRecord, RecordDict
    from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
    from flwr.serverapp.strategy.multikrum import select_multikrum
    from flwr.server.strategy import aggregate as legacy

    n, d = stack.shape
    cpu = torch.device("cpu")
    rows = [stack[i].copy() for i in range(n)]
    contents = [RecordDict({"arrays": ArrayRecord([row])}) for row in rows]
    results = [([row], 1) for row in rows]
    beta_fraction = (f + 0.5) / n  # int(beta * n) == f: Flower trims int(beta * n) per side
    theta = n - 2 * f
    timings: List[Timing] = []

    def record(rule: str, implementation: str, fn: Callable[[], np.ndarray], note: str = "") -> Optional[float]:
        seconds, value = time_call(fn, repeats, cpu)
        diff = float(np.max(np.abs(np.asarray(value, dtype=np.float64) - outputs[rule]))) if rule in outputs else None
        timings.append(Timing(n, d, rule, implementation, seconds, diff, note))
        print(f"  n={n} d={d} {rule:18s} {implementation:28s} {seconds:8.4f} s  diff={diff}", flush=True)
        return seconds

    def message_multikrum(m: int) -> np.ndarray:
        chosen = select_multikrum(contents, f, m)
        return np.mean([c["arrays"].to_numpy_ndarrays()[0] for c in chosen], axis=0)

    record("krum", "Flower message API", lambda: message_multikrum(1))
    record("multi-krum", "Flower message API", lambda: message_multikrum(n - f))
    record("median", "Flower message API", lambda: np.median(stack, axis=0))
    record("trimmed-mean", "Flower message API", lambda: trim_mean(stack, beta_fraction))

    def message_bulyan() -> np.ndarray:
        chosen = select_multikrum(contents, f, theta)
        selected = [c["arrays"].to_numpy_ndarrays() for c in chosen]
        median = [np.median(np.stack([s[0] for s in selected]), axis=0)]
        return aggregate_n_closest_weights(median, selected, theta - 2 * f)[0]

    record("bulyan", "Flower message API", message_bulyan, "one-shot MultiKrum selection")
    krum_s = record("krum", "Flower legacy", lambda: legacy.aggregate_krum(results, f, 0)[0])
    record("multi-krum", "Flower legacy", lambda: legacy.aggregate_krum(results, f, n - f)[0])
    record("median", "Flower legacy", lambda: legacy.aggregate_median(results)[0])
    record("trimmed-mean", "Flower legacy", lambda: legacy.aggregate_trimmed_avg(results, beta_fraction)[0])
    projected = (krum_s or 0.0) * theta
    if projected <= budget_s:
        record(
            "bulyan",
            "Flower legacy",
            lambda: legacy.aggregate_bulyan(list(results), f, legacy.aggregate_krum, to_keep=0)[0],
        )
    else:
        timings.append(Timing(n, d, "bulyan", "Flower legacy", None, None, f"skipped: projected {projected:.0f} s"))
    record("trimmed-mean", "numpy np.sort reference", lambda: np.sort(stack, axis=0)[f : n - f].mean(axis=0))
    return timings


def selection_study(n: int, d: int, f: int, seed: int, repeats: int) -> List[tuple[str, float]]:
    """Time the ways to get per-coordinate order statistics on CPU (the choice behind
    :mod:`aggregators.order_stats` and ``DEFAULT_MAX_CHUNK_BYTES``)."""
    from aggregators.geometry import sorted_coordinates

    cpu = torch.device("cpu")
    stack = make_stack(n, d, f, seed)
    x = torch.from_numpy(stack)
    k = (n + 1) // 2
    candidates: List[tuple[str, Callable[[], object]]] = [
        ("torch.sort(x, dim=0)", lambda: torch.sort(x, dim=0)),
        ("torch.kthvalue(x, k, dim=0) (one order statistic)", lambda: torch.kthvalue(x, k, dim=0)),
        ("torch.median(x, dim=0)", lambda: torch.median(x, dim=0)),
        (f"torch.topk(x, {f}, dim=0) both sides (trim f)", lambda: (torch.topk(x, f, dim=0), torch.topk(x, f, dim=0, largest=False))),
        ("np.sort(x, axis=0)", lambda: np.sort(stack, axis=0)),
        (f"np.partition(x, ({f}, {n - f - 1}), axis=0)", lambda: np.partition(stack, (f, n - f - 1), axis=0)),
        ("np.median(x, axis=0)", lambda: np.median(stack, axis=0)),
        ("sorted_coordinates(x) whole (transposed copy + np sort rows)", lambda: sorted_coordinates(x)),
    ]
    for mib in (1, 8, 64, 256):
        rule = aggregators.build("trimmed-mean", num_byzantine=f, max_chunk_bytes=mib * 1024 * 1024)
        candidates.append((f"Phalanx trimmed-mean, max_chunk_bytes={mib} MiB", lambda rule=rule: rule(x)))
    rule = aggregators.build("trimmed-mean", num_byzantine=f)
    threads = torch.get_num_threads()
    for count in sorted({1, threads}):
        candidates.append((f"Phalanx trimmed-mean, {count} thread(s)", lambda count=count: with_threads(count, lambda: rule(x))))
    results = []
    for label, fn in candidates:
        seconds, _ = time_call(fn, repeats, cpu)
        results.append((label, seconds))
        print(f"  selection study n={n} d={d}: {label:60s} {seconds:8.4f} s", flush=True)
    return results


def with_threads(count: int, fn: Callable[[], object]) -> object:
    """Call ``fn`` with ``torch.get_num_threads() == count`` (Phalanx's worker-thread cap)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def distance_study(n: int, d: int, f: int, seed: int, repeats: int) -> List[tuple[str, float, float]]:
    """Krum's pairwise squared distances: time and worst relative error against float64
    differences summed directly, on the benchmark stack."""
    from aggregators.geometry import pairwise_sq_distances

    cpu = torch.device("cpu")
    stack = make_stack(n, d, f, seed)
    x = torch.from_numpy(stack)
    reference = np.zeros((n, n))
    for start in range(0, d, 1 << 16):
        block = stack[:, start : start + (1 << 16)].astype(np.float64)
        for i in range(n):
            reference[i] += np.square(block - block[i]).sum(axis=1)
    off = ~np.eye(n, dtype=bool)

    def flower_expansion() -> np.ndarray:
        norms = np.square(stack).sum(axis=1)  # Flower's compute_distances, without the record decoding
        return norms[:, None] + norms[None, :] - 2 * stack @ stack.T

    candidates: List[tuple[str, Callable[[], object]]] = [
        ("Flower: float32 x.x + y.y - 2 x.y on the raw rows", flower_expansion),
    ]
    threads = torch.get_num_threads()
    for count in sorted({1, threads}):
        candidates.append(
            (f"Phalanx pairwise_sq_distances, {count} thread(s)", lambda count=count: with_threads(count, lambda: pairwise_sq_distances(x)))
        )
    results = []
    for label, fn in candidates:
        seconds, value = time_call(fn, repeats, cpu)
        value = np.asarray(value, dtype=np.float64)
        error = float((np.abs(value - reference)[off] / reference[off]).max())
        results.append((label, seconds, error))
        print(f"  distance study n={n} d={d}: {label:60s} {seconds:8.4f} s  max rel err {error:.2e}", flush=True)
    return results


def machine_description(device: torch.device) -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        f"CPU: {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
        + (f" (--threads {_THREADS}: OMP/OpenBLAS too)" if _THREADS is not None else ""),
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}",
    ]
    try:
        import flwr

        parts.append(f"flwr {flwr.__version__}")
    except ImportError:
        parts.append("flwr not installed")
    if device.type == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name(device)}")
    if hasattr(os, "getloadavg"):
        parts.append("load average at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    return "; ".join(parts)


def render(
    timings: List[Timing],
    command: str,
    machine: str,
    device: torch.device,
    f_of: Callable[[int], int],
    wall: float,
    study: Optional[tuple[int, int, List[tuple[str, float]]]] = None,
    distances: Optional[tuple[int, int, List[tuple[str, float, float]]]] = None,
    load_end: str = "",
) -> str:
    lines = [
        "# Aggregation benchmarks",
        "",
        "Generated by `benchmarks/aggregation.py`; rerun it to refresh this file.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine}",
        f"- Device for Phalanx: {device}; Flower's kernels are numpy on CPU.",
        f"- Total benchmark wall time: {wall:.0f} s" + (f"; load average at the end: {load_end}" if load_end else ""),
        "- Input: float32, n - f rows `1 + 0.01 N(0,1)`, f rows shifted by +10, f = max(1, n // 10).",
        "- Seconds: minimum over >= 3 calls (fast kernels: until 0.5 s spent, <= 20 calls) after a warm-up; kernels over 2 s timed once.",
        "- max |diff|: largest coordinate difference from Phalanx's output for the same rule (blank: no comparable output).",
        "",
    ]
    sizes = sorted({(t.n, t.d) for t in timings})
    for n, d in sizes:
        lines += [f"## n = {n}, d = {d:,}, f = {f_of(n)}", "", "| rule | implementation | seconds | vs Phalanx | max abs diff | note |", "|---|---|---:|---:|---:|---|"]
        ours = {t.rule: t.seconds for t in timings if (t.n, t.d) == (n, d) and t.implementation == "Phalanx"}
        rows = [t for t in timings if (t.n, t.d) == (n, d)]
        rows.sort(key=lambda t: (t.rule, t.implementation != "Phalanx", t.implementation))
        for t in rows:
            seconds = "" if t.seconds is None else f"{t.seconds:.4f}"
            base = ours.get(t.rule)
            ratio = "" if t.seconds is None or not base or t.implementation == "Phalanx" else f"{t.seconds / base:.1f}x"
            diff = "" if t.max_abs_diff is None else f"{t.max_abs_diff:.2e}"
            lines.append(f"| {t.rule} | {t.implementation} | {seconds} | {ratio} | {diff} | {t.note} |")
        lines.append("")
    lines += [
        "## Reading the tables",
        "",
        "- \"vs Phalanx\": the baseline's time divided by Phalanx's for the same rule (above 1: Phalanx is faster).",
        "- Phalanx's CPU kernels split the columns over up to `torch.get_num_threads()` threads (see the machine",
        "  line); Flower's kernels and the numpy reference run on one thread. The studies below show both.",
        "- Phalanx's rules do more per call than Flower's kernels: they reject NaN/Inf rows, accumulate in",
        "  float64, and compute per-client `scores` and `selected` (in the same pass for the coordinate-wise rules).",
        "- A non-zero diff for Krum means the two picked different rows: Flower computes",
        "  |x|^2 + |y|^2 - 2 x.y in float32 on the raw rows, which cancels when rows are close to each other",
        "  and far from 0 (see the distance study); Phalanx's distances are within 1e-5 of float64",
        "  differences (tests/test_aggregators_exactness.py, tests/test_aggregators_kernels.py). Diffs ~1e-7",
        "  are float32 rounding of the averages.",
        "- Bulyan differs by definition: Flower's message API picks theta rows with one MultiKrum pass,",
        "  its legacy version iterates Krum with index tie-breaks; Phalanx iterates Krum (El Mhamdi et al. 2018)",
        "  with order-free tie-breaks.",
        "- On a shared machine, timings of multi-threaded kernels measure the other processes too; the",
        "  load average at start is in the machine line. `--threads 1` makes runs comparable under load.",
        "",
    ]
    if study is not None:
        n, d, rows = study
        lines += [
            f"## Order statistics on CPU: which kernel (n = {n}, d = {d:,}, f = {f_of(n)})",
            "",
            "How coordinate-wise rules get their sorted values, and how the chunk size and threads matter. The",
            "library (`aggregators/order_stats.py`) copies each block of columns transposed into a reused buffer",
            "(each coordinate's n values contiguous), sorts the rows with numpy's SIMD sort, and splits the blocks",
            "over threads; `max_chunk_bytes` bounds all threads' buffers together.",
            "",
            "| kernel | seconds |",
            "|---|---:|",
        ]
        lines += [f"| {label} | {seconds:.4f} |" for label, seconds in rows]
        lines.append("")
    if distances is not None:
        n, d, rows = distances
        lines += [
            f"## Pairwise distances for Krum (n = {n}, d = {d:,}, f = {f_of(n)})",
            "",
            "Worst relative error over all pairs against float64 differences summed directly. Phalanx: float64",
            "Gram tiles of rows centred on a central row, every pair's worst-case rounding error checked, the",
            "failing clusters (the f attackers here) centred on their own row in the same pass",
            "(`aggregators/geometry.py`). float32 tile sums were tried and rejected: their error grows with the",
            "partial sums and reached 1.1e-5 on a stack with two client groups.",
            "",
            "| kernel | seconds | max relative error |",
            "|---|---:|---:|",
        ]
        lines += [f"| {label} | {seconds:.4f} | {error:.1e} |" for label, seconds, error in rows]
        lines.append("")
    return "\n".join(lines)


def parse_ints(text: str) -> List[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def _kept_sections(path: Path) -> str:
    """Sections other benchmarks wrote into the same file (``<!-- name:begin -->`` .. ``<!-- name:end -->``).

    This benchmark rewrites the aggregator tables; those sections are theirs and are carried over.
    """
    if not path.exists():
        return ""
    import re

    found = re.finditer(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", path.read_text(), re.DOTALL)
    return "".join(f"\n{match.group(0)}\n" for match in found)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="20,50", help="comma list of client counts")
    parser.add_argument("--d", default="100000,1000000", help="comma list of dimensions (1e6 style accepted)")
    parser.add_argument("--device", default="cpu", help="device for Phalanx's rules (cpu, cuda, cuda:1)")
    parser.add_argument("--rules", default="all", help="comma list of Phalanx rules, or 'all'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flower", action="store_true", help="time Phalanx only")
    parser.add_argument("--flower-budget-s", type=float, default=30.0, help="skip Flower legacy Bulyan above this projected time")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch, OpenMP and OpenBLAS (set before they load); default: library defaults",
    )
    parser.add_argument("--no-study", action="store_true", help="skip the CPU kernel studies (order statistics, distances)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    rules = aggregators.available() if args.rules == "all" else [r.strip() for r in args.rules.split(",")]

    def f_of(n: int) -> int:
        return max(1, n // 10)

    command = "python benchmarks/aggregation.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    machine = machine_description(device)
    started = time.perf_counter()
    timings: List[Timing] = []
    for n in parse_ints(args.n):
        for d in parse_ints(args.d):
            f = f_of(n)
            stack = make_stack(n, d, f, args.seed)
            ours, outputs = phalanx_timings(stack, f, rules, args.repeats, device)
            timings += ours
            if not args.no_flower:
                timings += flower_timings(stack, f, args.repeats, args.flower_budget_s, outputs)
    study = distances = None
    if not args.no_study:
        n_study, d_study = max(parse_ints(args.n)), max(parse_ints(args.d))
        study = (n_study, d_study, selection_study(n_study, d_study, f_of(n_study), args.seed, args.repeats))
        distances = (n_study, d_study, distance_study(n_study, d_study, f_of(n_study), args.seed, args.repeats))
    wall = time.perf_counter() - started
    load_end = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else ""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    text = render(timings, command, machine, device, f_of, wall, study, distances, load_end)
    Path(args.out).write_text(text + _kept_sections(Path(args.out)))
    print(f"wrote {args.out} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
