"""Cost and detection of the client-side data audit (client/data_audit.py) per client partition.

Usage::

    python benchmarks/data_audit.py                              # digits, sizes 100,180,500,1000,1797,4000
    python benchmarks/data_audit.py --sizes 180,1000 --repeats 5 --out /tmp/audit-bench.md
    python benchmarks/data_audit.py --data images                # 3x32x32 stand-in images: cost + detection
    python benchmarks/data_audit.py --data images --background 0.9 --saturated --partitions 12

Inputs. ``digits``: scikit-learn's bundled digits (8x8 images / 16, 10 classes, offline), a
random subset of each size (fixed seed); sizes above the 1,797 digits are made of the digits plus
copies with N(0, 0.02) pixel noise clipped to [0, 1] (no exact duplicates), to show the blocked
path (partitions above ``BLOCK_SIZE`` are judged in blocks). ``images``: the CIFAR-10-shaped
stand-in of tests/data_audit_cases.py (``standin_images``: class-conditional smooth colour
patterns plus noise, (N, 3, 32, 32) in [0, 1], 10 classes; ``--background`` sets how much of each
sample is class-free, ``--saturated`` gives classes flat white and black regions), given to the
audit as (N, 3, 32, 32) with ``image_shape=(3, 32, 32)``.

Cost: each size is audited twice, clean and with 20% of the labels flipped plus a 3x3 trigger
(every channel set to 1, bottom-right, as the attacks stamp it) on 5% relabelled to class 0.
Timings are the minimum over ``--repeats`` calls after one warm-up (the minimum, because the
machine may be shared); "s / 1k samples" is that time divided by the size in thousands.

Detection (``images`` only): ``--partitions`` IID partitions of ``--partition-size`` samples of
one 3,000-sample stand-in set, each audited clean, with 10% and 20% of labels flipped to a random
other class, and with four triggers on 5% (10% for the 5x5) relabelled to a class of under 20% of
the partition. Precision and recall are of the flagged rows (flips) or the rows flagged
``trigger`` (triggers), averaged over partitions, with the worst partition's.

Prints markdown tables with the machine and the command, and writes them to ``--out`` if given.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the stand-in image generator
from data_audit_cases import flag_mask, flip_labels, precision_recall, stamp_trigger, standin_images  # noqa: E402

from client.data_audit import BLOCK_SIZE, audit_dataset  # noqa: E402

DIGITS_IMAGE = (1, 8, 8)
STANDIN_IMAGE = (3, 32, 32)
#: Triggers of the detection table: (name, side, value per channel, corner, share of the partition).
TRIGGERS = (
    ("3x3 white, bottom-right (the attacks' Trigger)", 3, 1.0, "bottom-right", 0.05),
    ("3x3 black, bottom-right", 3, 0.0, "bottom-right", 0.05),
    ("3x3 red (1, 0, 0), bottom-right", 3, (1.0, 0.0, 0.0), "bottom-right", 0.05),
    ("5x5 white, top-left", 5, 1.0, "top-left", 0.10),
)


def _digits_pool(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` digits samples: a random subset, or the digits plus noisy copies beyond 1,797."""
    bunch = load_digits()
    x, y = (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    while len(x) < size:
        noisy = np.clip(x[: len(bunch.target)] + rng.normal(0.0, 0.02, (len(bunch.target), 64)), 0.0, 1.0)
        x, y = np.vstack([x, noisy.astype(np.float32)]), np.concatenate([y, bunch.target])
    chosen = rng.choice(len(y), size, replace=False)
    return x[chosen], y[chosen]


def _poison(x: np.ndarray, y: np.ndarray, image_shape: tuple[int, int, int],
            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """20% labels flipped to a random other class, then a 3x3 bottom-right patch on 5% relabelled to 0."""
    rng = np.random.default_rng(seed)
    y, _ = flip_labels(y, 0.2, rng)
    stamped = rng.choice(len(y), int(round(0.05 * len(y))), replace=False)
    y[stamped] = 0
    return stamp_trigger(x, stamped, image_shape), y


def _time_audit(x: np.ndarray, y: np.ndarray, image_shape: tuple[int, int, int], repeats: int) -> tuple[float, int]:
    report = audit_dataset(x, y, num_classes=10, image_shape=image_shape)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        report = audit_dataset(x, y, num_classes=10, image_shape=image_shape)
        best = min(best, time.perf_counter() - started)
    return best, report.flagged


def _cost_table(args: argparse.Namespace, sizes: list[int]) -> list[str]:
    image_shape = DIGITS_IMAGE if args.data == "digits" else STANDIN_IMAGE
    lines = [
        "| samples | clean: s | clean: s / 1k samples | clean: flagged | poisoned: s | poisoned: s / 1k samples "
        "| poisoned: flagged |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        if args.data == "digits":
            x, y = _digits_pool(size, args.seed)
        else:
            x, y = standin_images(size, args.seed, background=args.background, saturated=args.saturated)
        clean_s, clean_flagged = _time_audit(x, y, image_shape, args.repeats)
        x_bad, y_bad = _poison(x, y, image_shape, args.seed + 1)
        bad_s, bad_flagged = _time_audit(x_bad, y_bad, image_shape, args.repeats)
        lines.append(
            f"| {size} | {clean_s:.3f} | {clean_s / size * 1000:.3f} | {clean_flagged} "
            f"| {bad_s:.3f} | {bad_s / size * 1000:.3f} | {bad_flagged} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def _detection_table(args: argparse.Namespace) -> list[str]:
    x_all, y_all = standin_images(3000, args.seed, background=args.background, saturated=args.saturated)
    audit = {"num_classes": 10, "image_shape": STANDIN_IMAGE}
    rows: dict[str, list[tuple[float, float]]] = {"clean: flagged share, trigger flags": []}
    seconds = []
    for part in range(args.partitions):
        rng = np.random.default_rng([args.seed, part])
        idx = rng.choice(len(y_all), args.partition_size, replace=False)
        x, y = x_all[idx], y_all[idx]
        clean = audit_dataset(x, y, **audit)
        seconds.append(clean.seconds)
        rows["clean: flagged share, trigger flags"].append((clean.flagged / len(y), clean.by_reason["trigger"]))
        for fraction in (0.1, 0.2):
            flipped, truth = flip_labels(y, fraction, rng)
            report = audit_dataset(x, flipped, **audit)
            rows.setdefault(f"{fraction:.0%} labels flipped", []).append(precision_recall(flag_mask(report), truth))
        minority = [c for c in range(10) if np.mean(y == c) < 0.2]
        for name, side, value, corner, share in TRIGGERS:
            stamped = rng.choice(len(y), int(round(share * len(y))), replace=False)
            labels = y.copy()
            labels[stamped] = minority[part % len(minority)]
            report = audit_dataset(stamp_trigger(x, stamped, STANDIN_IMAGE, size=side, value=value, corner=corner),
                                   labels, **audit)
            seconds.append(report.seconds)
            truth = np.zeros(len(y), dtype=bool)
            truth[stamped] = True
            rows.setdefault(f"trigger {name} on {share:.0%}", []).append(
                precision_recall(flag_mask(report, "trigger"), truth))
        print(f"partition {part} done", file=sys.stderr, flush=True)
    lines = [
        f"Detection on {args.partitions} IID partitions of {args.partition_size} (background {args.background}, "
        f"saturated {args.saturated}); audit seconds per call: median {np.median(seconds):.2f}, "
        f"max {np.max(seconds):.2f}",
        "",
        "| case | precision (mean, worst) | recall (mean, worst) |",
        "|---|---:|---:|",
    ]
    for name, values in rows.items():
        a = np.array(values, dtype=float)
        if name.startswith("clean"):
            lines.append(f"| {name} | flagged share mean {a[:, 0].mean():.3f}, max {a[:, 0].max():.3f} "
                         f"| trigger flags in all: {int(a[:, 1].sum())} |")
        else:
            lines.append(f"| {name} | {a[:, 0].mean():.3f}, {a[:, 0].min():.3f} | {a[:, 1].mean():.3f}, "
                         f"{a[:, 1].min():.3f} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("digits", "images"), default="digits")
    parser.add_argument("--sizes", default=None,
                        help="comma list of partition sizes (default 100,180,500,1000,1797,4000 for digits, "
                             "100,300,500,1000,3000 for images)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (the minimum is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--background", type=float, default=0.8, help="images: most class-free share of a sample")
    parser.add_argument("--saturated", action="store_true", help="images: classes own flat white/black regions")
    parser.add_argument("--partitions", type=int, default=8, help="images: partitions in the detection table")
    parser.add_argument("--partition-size", type=int, default=300, help="images: samples per partition")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    default_sizes = "100,180,500,1000,1797,4000" if args.data == "digits" else "100,300,500,1000,3000"
    sizes = [int(s) for s in (args.sizes or default_sizes).split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes must be positive integers, got {args.sizes!r}")
    if args.partitions < 1 or args.partition_size < 20:
        parser.error("--partitions must be >= 1 and --partition-size >= 20")

    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/data_audit.py", *given])
    shape = DIGITS_IMAGE if args.data == "digits" else STANDIN_IMAGE
    lines = [
        f"## Client data audit: cost per client ({args.data})",
        "",
        f"- machine: `{platform.platform()}`, processor `{platform.processor() or platform.machine()}`, "
        f"`os.cpu_count()` = {os.cpu_count()}, Python {platform.python_version()}, numpy {np.__version__}",
        f"- command: `{command}`",
        f"- audit: k=10, threshold 0.5, image_shape {shape}, BLOCK_SIZE {BLOCK_SIZE}; BLAS limited to 1 thread "
        "inside the audit; time = min over repeats",
        "",
        *_cost_table(args, sizes),
    ]
    if args.data == "images":
        lines += ["", *_detection_table(args)]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
