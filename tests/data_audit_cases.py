"""Digits audit cases whose outcome is pinned by tests/data/data_audit_digits_golden.json.

Shared by the regression test (tests/test_data_audit.py) and the script that wrote the golden
file (``python tests/data_audit_cases.py --write``, run once on the audit as it was before image
tasks, commit 92ca0ad). Every case is a digits partition (8x8 images scaled to [0, 1]) given to
``audit_dataset`` as flat (N, 64) rows with ``image_shape=(8, 8)`` unless it says otherwise. The
partitions are frozen in the golden file (four IID subsets of 180 samples, four Dirichlet(0.5)
partitions of a 10-client split as ``client.data.partition`` drew them at that commit), so the
cases do not move when the ClientApp's partitioner does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

GOLDEN = Path(__file__).parent / "data" / "data_audit_digits_golden.json"
NUM_CLASSES = 10
IMAGE = (8, 8)
CORNERS = {
    "top-left": (slice(0, 3), slice(0, 3)),
    "top-right": (slice(0, 3), slice(5, 8)),
    "bottom-left": (slice(5, 8), slice(0, 3)),
    "bottom-right": (slice(5, 8), slice(5, 8)),
}


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, pixels scaled to [0, 1] (float32), labels int64."""
    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def frozen_partitions() -> list[tuple[str, np.ndarray]]:
    """The eight partitions recorded in the golden file, in order."""
    document = json.loads(GOLDEN.read_text())
    return [(name, np.array(rows, dtype=np.int64)) for name, rows in document["partitions"].items()]


def flip_labels(y: np.ndarray, fraction: float, rng: np.random.Generator,
                num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Give ``fraction`` of the samples a uniformly random other class; return labels and truth mask."""
    chosen = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
    flipped = y.copy()
    flipped[chosen] = (y[chosen] + rng.integers(1, num_classes, len(chosen))) % num_classes
    truth = np.zeros(len(y), dtype=bool)
    truth[chosen] = True
    return flipped, truth


def flag_mask(report: Any, reason: str | None = None) -> np.ndarray:
    """(N,) mask of the rows a report flagged (for ``reason`` only, when given)."""
    mask = np.zeros(report.checked, dtype=bool)
    if reason is None:
        mask[report.flagged_indices] = True
    else:
        mask[[i for i, reasons in report.reasons.items() if reason in reasons]] = True
    return mask


def precision_recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Precision and recall of mask ``found`` against mask ``truth`` (1 for an empty denominator's 0 hits)."""
    hits = int((found & truth).sum())
    return hits / max(int(found.sum()), 1), hits / max(int(truth.sum()), 1)


def stamp_corner(x: np.ndarray, y: np.ndarray, corner: str, fraction: float, target: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A white 3x3 patch in ``corner`` on ``fraction`` of the flat 8x8 rows, relabelled to ``target``."""
    rows, cols = CORNERS[corner]
    images = x.copy().reshape(len(x), *IMAGE)
    labels = y.copy()
    stamped = rng.choice(len(x), int(round(fraction * len(x))), replace=False)
    images[stamped, rows, cols] = 1.0
    labels[stamped] = target
    truth = np.zeros(len(x), dtype=bool)
    truth[stamped] = True
    return images.reshape(len(x), -1), labels, truth


def cases(partitions: list[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]]:
    """Every pinned case: (name, flat x, y, keyword arguments of ``audit_dataset``).

    The keyword ``block_size`` is not an argument of ``audit_dataset``: the runner sets
    ``client.data_audit.BLOCK_SIZE`` to it for that case.
    """
    x_all, y_all = digits()
    image = {"num_classes": NUM_CLASSES, "image_shape": IMAGE}
    for case, (name, idx) in enumerate(partitions):
        x, y = x_all[idx], y_all[idx]
        yield f"clean/{name}", x, y, image
        flipped, _ = flip_labels(y, 0.2, np.random.default_rng(len(idx) + int(idx[0])))
        yield f"flip20/{name}", x, flipped, image
        minority = [c for c in range(NUM_CLASSES) if np.mean(y == c) < 0.2]
        for corner in CORNERS:
            x_t, y_t, _ = stamp_corner(x, y, corner, 0.05, minority[case % len(minority)],
                                       np.random.default_rng(100 + case))
            yield f"trigger-{corner}/{name}", x_t, y_t, image
    idx = partitions[0][1]
    x_t, y_t, _ = stamp_corner(x_all[idx], y_all[idx], "top-left", 0.05, 0, np.random.default_rng(2))
    yield "trigger-without-image-shape", x_t, y_t, {"num_classes": NUM_CLASSES}
    x_t, y_t, _ = stamp_corner(x_all, y_all, "bottom-left", 0.05, 7, np.random.default_rng(9))
    yield "trigger-whole-dataset", x_t, y_t, image
    x_b, y_b = x_all[idx].copy(), y_all[idx].copy()
    x_b[0, 5], x_b[1, 9], y_b[2], y_b[3], x_b[4, 30] = np.nan, np.inf, NUM_CLASSES, -1, 1.5
    x_b[6], y_b[6] = x_b[5], (y_b[5] + 1) % NUM_CLASSES
    x_b[8], y_b[8] = x_b[7], y_b[7]
    yield "schema-errors", x_b, y_b, image
    yield "schema-errors-no-range", x_b, y_b, image | {"feature_range": None}
    big = np.random.default_rng(7).choice(len(y_all), 400, replace=False)
    flipped, _ = flip_labels(y_all[big], 0.2, np.random.default_rng(8))
    yield "flip20-blocks-of-150", x_all[big], flipped, image | {"block_size": 150}
    flipped, _ = flip_labels(y_all[idx], 0.2, np.random.default_rng(12))
    yield "flip20-user-model", x_all[idx], flipped, {"num_classes": NUM_CLASSES,
                                                      "model_fn": lambda: LogisticRegression(max_iter=300)}
    rng = np.random.default_rng(5)
    centres = rng.normal(0.0, 1.5, size=(5, 16))
    y_tab = rng.integers(0, 5, 200)
    x_tab = centres[y_tab] + rng.normal(0.0, 1.0, size=(200, 16))
    x_tab[:, 0] *= 1000.0
    flipped = y_tab.copy()
    chosen = rng.choice(200, 30, replace=False)
    flipped[chosen] = (flipped[chosen] + rng.integers(1, 5, 30)) % 5
    yield "tabular-standardised", x_tab, flipped, {"num_classes": 5, "feature_range": None}


def outcome(report: Any) -> dict[str, Any]:
    """What the golden file pins of one report: flags, reasons, per-reason counts and scores."""
    return {
        "flagged": [int(i) for i in report.flagged_indices],
        "reasons": {str(i): list(r) for i, r in sorted(report.reasons.items())},
        "by_reason": {k: int(v) for k, v in report.by_reason.items()},
        "scores": [float(s) for s in report.scores],
    }


def run_case(x: np.ndarray, y: np.ndarray, kwargs: dict[str, Any]) -> Any:
    """``audit_dataset`` on one case (with its ``block_size``, if any, set for the call only)."""
    import client.data_audit as data_audit

    arguments = dict(kwargs)
    block_size = arguments.pop("block_size", None)
    saved = data_audit.BLOCK_SIZE
    try:
        if block_size is not None:
            data_audit.BLOCK_SIZE = block_size
        return data_audit.audit_dataset(x, y, **arguments)
    finally:
        data_audit.BLOCK_SIZE = saved


def _write_golden() -> None:
    from client.data import partition

    _, y_all = digits()
    iid = {f"iid-{seed}": np.sort(np.random.default_rng(seed).choice(len(y_all), 180, replace=False))
           for seed in range(4)}
    skewed = [part for part in partition(y_all, 10, alpha=0.5, seed=3) if len(part) >= 100][:4]
    frozen = iid | {f"dirichlet-{i}": part for i, part in enumerate(skewed)}
    document: dict[str, Any] = {
        "written_by": "python tests/data_audit_cases.py --write, on client/data_audit.py at commit 92ca0ad",
        "partitions": {name: [int(i) for i in rows] for name, rows in frozen.items()},
        "cases": {},
    }
    for name, x, y, kwargs in cases(list(frozen.items())):
        document["cases"][name] = outcome(run_case(x, y, kwargs))
        print(name, len(document["cases"][name]["flagged"]), file=sys.stderr)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(document) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/data_audit_cases.py --write   (rewrites the golden file)")
    _write_golden()


# ---------------------------------------------------------------------------------------------
# A stand-in for the generated CIFAR-10-shaped images (3x32x32, 10 classes, pixels in [0, 1])
# ---------------------------------------------------------------------------------------------


def standin_images(num_samples: int, seed: int, *, num_classes: int = 10, size: int = 32, noise: float = 0.1,
                   background: float = 0.8, saturated: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Class-conditional smooth colour patterns plus noise: (N, 3, size, size) float32 in [0, 1].

    Each class has a prototype: per channel, a sum of three random low-frequency 2-D cosines. A
    sample is its class's prototype blended with one of 20 class-free background patterns (weight
    uniform in [0, ``background``]: the knob of difficulty), shifted by up to 2 pixels, with a
    per-channel brightness offset (N(0, 0.05)) and per-pixel N(0, ``noise``) noise, clipped to
    [0, 1]. ``saturated`` stretches the prototypes past [0, 1] before clipping, so that classes own flat white and black regions
    (natural class-specific extreme patches that a trigger screen must not take for triggers).

    Not a calibrated copy of any dataset: a learnable image task of the right shape, whose
    difficulty is measured (a 5-fold 10-NN accuracy on raw pixels: about 1.0, 0.87 and 0.78 at
    ``background`` 0.5, 0.8 and 0.9 on 600 samples; pixel noise barely moves it).
    """
    rng = np.random.default_rng(seed)
    grid = np.arange(size) / size

    def patterns(count: int) -> np.ndarray:
        out = np.zeros((count, 3, size, size))
        for _ in range(3):
            fy, fx = rng.integers(0, 4, size=(2, count, 3, 1, 1))
            phase = rng.uniform(0, 2 * np.pi, size=(count, 3, 1, 1))
            out += rng.uniform(0.5, 1.0, size=(count, 3, 1, 1)) * np.cos(
                2 * np.pi * (fy * grid[:, None] + fx * grid[None, :]) + phase)
        low = out.min(axis=(2, 3), keepdims=True)
        high = out.max(axis=(2, 3), keepdims=True)
        return (out - low) / np.maximum(high - low, 1e-9)

    stretch = (-0.3, 1.3) if saturated else (0.15, 0.85)
    prototypes = stretch[0] + (stretch[1] - stretch[0]) * patterns(num_classes)
    backgrounds = 0.15 + 0.7 * patterns(20)
    y = rng.integers(0, num_classes, num_samples)
    blend = rng.uniform(0.0, background, size=(num_samples, 1, 1, 1))
    x = (1 - blend) * prototypes[y] + blend * backgrounds[rng.integers(0, 20, num_samples)]
    shifts = rng.integers(-2, 3, size=(num_samples, 2))
    for i, (dy, dx) in enumerate(shifts):
        x[i] = np.roll(x[i], (dy, dx), axis=(1, 2))
    x += rng.normal(0.0, 0.05, size=(num_samples, 3, 1, 1)) + rng.normal(0.0, noise, size=x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32), y.astype(np.int64)


def stamp_trigger(x: np.ndarray, rows: np.ndarray, image_shape: tuple[int, int, int], *, size: int = 3,
                  value: float | tuple[float, ...] = 1.0, corner: str = "bottom-right") -> np.ndarray:
    """A copy of (N, ...) ``x`` with a ``size x size`` patch in ``corner`` of the H x W plane set,
    on every channel, to ``value`` (one number, as the attacks' ``Trigger`` stamps it in the
    bottom-right, or one per channel: a coloured patch) on ``rows``."""
    channels, height, width = image_shape
    images = np.array(x, dtype=np.float32, copy=True).reshape(len(x), channels, height, width)
    top = 0 if corner.startswith("top") else height - size
    left = 0 if corner.endswith("left") else width - size
    patch = np.broadcast_to(np.asarray(value, dtype=np.float32).reshape(-1, 1, 1), (channels, size, size))
    images[np.asarray(rows), :, top:top + size, left:left + size] = patch
    return images.reshape(x.shape)
