"""Cost of the client-side data audit (client/data_audit.py) per client partition.

Usage::

    python benchmarks/data_audit.py                              # sizes 100,180,500,1000,1797,4000
    python benchmarks/data_audit.py --sizes 180,1000 --repeats 5 --out /tmp/audit-bench.md

Inputs: scikit-learn's bundled digits (8x8 images / 16, 10 classes, offline), a random subset of
each size (fixed seed). Sizes above the 1,797 digits are made of the digits plus copies with
N(0, 0.02) pixel noise clipped to [0, 1] (no exact duplicates), to show the blocked path
(partitions above ``BLOCK_SIZE`` are judged in blocks). Each size is audited twice: clean, and with
20% of the labels flipped plus a 3x3 corner trigger on 5% relabelled to class 0, both with
``image_shape=(8, 8)`` (so trigger screening runs). Timings are the minimum over ``--repeats``
calls after one warm-up (the minimum, because the machine may be shared); "s / 1k samples" is
that time divided by the size in thousands.

Prints a markdown table with the machine and the command, and writes it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from client.data_audit import BLOCK_SIZE, audit_dataset

IMAGE = (8, 8)


def _pool(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` digits samples: a random subset, or the digits plus noisy copies beyond 1,797."""
    bunch = load_digits()
    x, y = (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    while len(x) < size:
        noisy = np.clip(x[: len(bunch.target)] + rng.normal(0.0, 0.02, (len(bunch.target), 64)), 0.0, 1.0)
        x, y = np.vstack([x, noisy.astype(np.float32)]), np.concatenate([y, bunch.target])
    chosen = rng.choice(len(y), size, replace=False)
    return x[chosen], y[chosen]


def _poison(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """20% labels flipped to a random other class, then a 3x3 corner patch on 5% relabelled to 0."""
    rng = np.random.default_rng(seed)
    x, y = x.copy(), y.copy()
    flipped = rng.choice(len(y), int(round(0.2 * len(y))), replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    stamped = rng.choice(len(y), int(round(0.05 * len(y))), replace=False)
    images = x.reshape(len(y), *IMAGE)
    images[stamped, -3:, -3:] = 1.0
    y[stamped] = 0
    return images.reshape(len(y), -1), y


def _time_audit(x: np.ndarray, y: np.ndarray, repeats: int) -> tuple[float, int]:
    report = audit_dataset(x, y, num_classes=10, image_shape=IMAGE)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        report = audit_dataset(x, y, num_classes=10, image_shape=IMAGE)
        best = min(best, time.perf_counter() - started)
    return best, report.flagged


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,180,500,1000,1797,4000", help="comma list of partition sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (the minimum is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes must be positive integers, got {args.sizes!r}")

    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/data_audit.py", *given])
    lines = [
        "## Client data audit: cost per client",
        "",
        f"- machine: `{platform.platform()}`, processor `{platform.processor() or platform.machine()}`, "
        f"`os.cpu_count()` = {os.cpu_count()}, Python {platform.python_version()}, numpy {np.__version__}",
        f"- command: `{command}`",
        f"- audit: k=10, threshold 0.5, image_shape (8, 8), BLOCK_SIZE {BLOCK_SIZE}; BLAS limited to 1 thread "
        "inside the audit; time = min over repeats",
        "",
        "| samples | clean: s | clean: s / 1k samples | clean: flagged | poisoned: s | poisoned: s / 1k samples "
        "| poisoned: flagged |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        x, y = _pool(size, args.seed)
        clean_s, clean_flagged = _time_audit(x, y, args.repeats)
        x_bad, y_bad = _poison(x, y, args.seed + 1)
        bad_s, bad_flagged = _time_audit(x_bad, y_bad, args.repeats)
        lines.append(
            f"| {size} | {clean_s:.3f} | {clean_s / size * 1000:.3f} | {clean_flagged} "
            f"| {bad_s:.3f} | {bad_s / size * 1000:.3f} | {bad_flagged} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
