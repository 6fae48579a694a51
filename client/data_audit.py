"""Client-side audit of a client's own training data, run before local training.

Robust aggregation protects the federation from bad clients; it does nothing for an honest
client whose data source was tampered with. :func:`audit_dataset` inspects the client's own
partition and :func:`apply_policy` decides what trains. Nothing here sends data anywhere: the
report's :meth:`AuditReport.metrics` holds counts only, and the review file stays on the client.

Data of any task: ``x`` is (N, *sample_shape) (flat (N, F) rows, (N, C, H, W) images, any other
sample shape); every check but the trigger screen sees each sample as its flat features. With
``image_shape`` ``(C, H, W)`` (or ``(H, W)``, read as ``(1, H, W)``) the samples are images,
given as (C, H, W) samples or flat in that channels-first order, and the trigger screen works in
image coordinates. A check that cannot apply to the data (no declared ``feature_range``: the
range rule; no ``image_shape``: the trigger screen; fewer than ``MIN_SAMPLES`` usable samples:
label consistency and triggers) flags nothing because it never looked: the report lists it in
:attr:`AuditReport.not_applicable` with the reason, :meth:`AuditReport.metrics` counts it as
``audit-not-applicable``, and :func:`log_not_applicable_once` says it once in the client's log.

Checks and reasons (a flagged sample carries one or more reasons):

``non-finite``
    A feature is NaN or infinite. Score 1.
``out-of-range``
    A feature lies outside ``feature_range``. Score 1.
``label-out-of-range``
    The label is not an integer in ``[0, num_classes)``. Score 1.
``duplicate-conflict``
    Exactly equal feature rows carry different labels; every copy is flagged (nothing says
    which label is right). Score 1.
``duplicate``
    A further copy of a row already present with the same label. Flagged so that ``drop`` keeps
    one copy; it takes the score of the first copy, which is judged (the copy is redundant, not
    wrong).
``label-inconsistent``
    The label-consistency score (below) is at least ``threshold``.
``trigger``
    The sample carries a confirmed backdoor trigger patch (below). Score 1.

Label-consistency score (in [0, 1]). Two independent judges of each sample's label, each
blind to the sample's own label:

* a **k-nearest-neighbour vote**: distance-weighted votes of the ``k`` nearest other samples,
  each class's votes divided by the most neighbours that class could supply, ``min(k, class
  size)`` (the class-prior correction: three votes from a class of three samples are full
  agreement, so a class the partition barely holds is not out-voted by the big ones' size);
* a **leave-one-out classifier**: kernel ridge regression on one-hot labels with an RBF kernel,
  whose exact leave-one-out predictions have a closed form (``Y - alpha / diag(inv(K + lam I))``),
  so every sample is judged by a model that never saw it, at the cost of one N x N solve.
  With ``model_fn`` a user model's 5-fold out-of-fold probabilities replace it.

Each judge's class scores are clipped at 0 and normalised to probabilities ``p``. In the
confident-learning way, each class ``c`` gets a threshold ``t_c`` = the mean ``p_c`` over the
samples labelled ``c`` (a class the judge is less sure of gets a lower bar), and the judge's
suspicion of sample ``i`` with label ``y`` is ``1 - q_y / max_c q_c`` with ``q_c = p_c / t_c``:
0 when the given label is the best (threshold-corrected) class, 0.5 when another class is twice
as likely, 1 when the given label gets no support at all. The score is the **minimum** of the two
judges: a sample is called inconsistent only when neither its neighbourhood nor the classifier
supports its label, which keeps honest hard-to-classify samples below 0.5. Scoring runs twice:
the second pass judges everyone against a reference set without the first pass's suspects, so
flipped labels no longer vote for each other. A label whose class has fewer than
``MIN_CLASS_SUPPORT`` (2) other samples in the reference set cannot be checked against its
class (a class nearly absent from a label-skewed partition is legitimate): its score is instead
the weaker judge's probability of its best class, so it is flagged only when both judges firmly
place the sample in one other class. The class thresholds ``t_c`` are floored at half the
largest one, so that a class made mostly of flipped labels cannot claim every sample it weakly
resembles. Non-image features are standardised per feature first; image pixels are used as
they are.

Trigger screening (image data only, ``image_shape`` given). Covered: triggers that stamp a
square patch of side 2 or more (anywhere in the H x W plane, through every channel) whose
values all sit at the extremes of the feature range (a solid white or black square, a red one,
a checkerboard, any fixed binary pattern across the channels) on samples relabelled to one
target class; the attacks' ``Trigger`` (every channel of a corner patch set to one value) is
one. A candidate is a group of at least ``max(3, 1% of N)`` samples sharing the same
``C * side * side``-bit pattern in the same 2x2 or 3x3 window, where at least half the window's
values are atypical, and at least 80% of the group carries one label ``c``. A value is atypical
when it differs from that pixel's median over the partition by half the range or more (ink on
the black background of digits), or when it is at an extreme that fewer than half the samples
share there (a white patch on colour images, whose medians sit mid-range, only half the range
away), so shared background is never a candidate. A candidate is **confirmed** when, with the
window masked out (on every channel) for everyone, at least 40% (``TRIGGER_FLIP_SHARE``) of
its ``c``-labelled members, and at least 3 of them, get a (leave-one-out) label-consistency score at or above ``threshold``: the stamped
images do not look like class ``c`` once the patch is hidden, while a natural class-specific
pattern still does. The members are judged among up to 500 other trusted samples, at most one
member per ten of those (a random subset of a larger group), so that two stamped samples of the
same true class rarely vouch for each other. (The share is below one half because stamped
samples that were of class ``c`` all along keep their label.) Every member of a confirmed group
is flagged.

Not covered: blended or low-amplitude triggers (pixels not at the range extremes), 1-pixel
triggers, triggers whose pattern or place varies between samples, clean-label backdoors
(trigger added to samples that already are of the target class: masking does not change their
class; so a trigger is also missed when most stamped samples already were of the target class,
e.g. a target class holding half of a skewed partition), triggers on fewer than
``max(3, 1% of N)`` samples, small groups whose stamped members pair up by true class (two
stamped 7s relabelled 0 vouch for each other), a trigger on one channel of a multi-channel image
(the other channels' values are not extreme), and non-image data. Measured on digits
partitions of 100-320 samples (3x3 patch in each corner on 5%, various targets): 216 of 220
cases found with precision and recall 1; the 4 misses are 3 cases whose target held 40-49% of
the partition and one pairing case; no trigger flag on the 55 clean partitions. Measured on a
CIFAR-10-shaped stand-in (tests/data_audit_cases.py ``standin_images``: 3x32x32 smooth colour
class patterns plus noise in [0, 1], a 10-NN gets 0.87 on raw pixels; 16 IID partitions of 300,
``python benchmarks/data_audit.py --data images --partitions 16``): the attacks' 3x3 white
trigger and a black one on 5% found on 16 of 16 with precision and recall 1, a red (1, 0, 0)
3x3 on 15 of 16, a white 5x5 on 10% on 13 of 16 (the misses: too few stamped samples lose the
target label once masked, the leave-one-out kernel judge being swayed by 30 members sharing the
label); nothing flagged that was not stamped; no trigger flag on clean partitions, including
ones whose classes own flat white and black regions. 10% flipped labels: precision 0.92,
recall 0.92 (worst partition 0.83, 0.80).

Cost: the pairwise distances are O(N^2 F) time, the kernel solve O(N^3), both O(N^2) memory, so
partitions larger than ``BLOCK_SIZE`` are judged in random blocks of at most that size and a
trigger candidate is judged on a subsample: the cost grows linearly beyond ``BLOCK_SIZE``.
Distances are exact on the raw features, whatever their number: at 3x32x32 = 3,072 features a
300 x 300 distance matrix is one 12 ms matrix product on one core, so cost asks for no projection,
and projecting each reference set onto its leading principal components was no clear gain on
the stand-in (8 partitions of 300): 20 components confirmed every trigger but cut the precision
on 10% flipped labels from 0.92 to 0.78 and tripled the flags on clean data; 50 components left
the label checks as they were and moved the 5x5 and red triggers from 7/8 to 8/8 and 7/8. So
nothing is projected (and digits, 64 features, are judged exactly as before). The trigger screen counts window
contents with summed-area tables and builds bit patterns only for candidate windows, so its
memory is O(N C H W). Measured (CPU seconds on one core of a shared 2-core machine): 300
stand-in images 0.16 s clean or poisoned, 1,000 0.75-0.85 s, 3,000 2.6 s; 300 whose classes own
flat saturated regions 0.5-1.0 s (8-21 natural candidate groups, about 40 ms each, at most
``MAX_TRIGGER_CANDIDATES``). The audit runs its BLAS single-threaded (clients run side by side).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.linalg import cho_factor, cho_solve
from sklearn.model_selection import KFold
from threadpoolctl import threadpool_limits

#: Every reason a sample can be flagged for, in the order they are reported.
REASONS = (
    "non-finite",
    "out-of-range",
    "label-out-of-range",
    "duplicate",
    "duplicate-conflict",
    "label-inconsistent",
    "trigger",
)
#: Policies accepted by :func:`apply_policy`.
POLICIES = ("report", "drop", "drop-and-review")
#: Reasons that mark a row as certainly unusable: score 1, excluded from every reference set.
HARD_REASONS = ("non-finite", "out-of-range", "label-out-of-range", "duplicate-conflict")
#: A label is judged only when its class has at least this many other reference samples.
MIN_CLASS_SUPPORT = 2
#: Largest set of samples judged together (the kernel solve is cubic in it, so the audit's cost
#: grows linearly with the partition beyond it).
BLOCK_SIZE = 1000
#: Most non-member samples a trigger candidate is judged against.
TRIGGER_REFERENCE = 500
#: A candidate's members judged at once are at most 1 / TRIGGER_MEMBER_RATIO of those non-members.
TRIGGER_MEMBER_RATIO = 10
#: Fewest usable samples for which label consistency is judged at all.
MIN_SAMPLES = 10
#: RBF width: gamma = KERNEL_SCALE / (num_features * variance of the features).
KERNEL_SCALE = 1.0
#: Ridge of the kernel classifier.
KERNEL_RIDGE = 1.0
#: Trigger windows tried (side lengths, in pixels).
TRIGGER_SIDES = (2, 3)
#: A trigger pixel lies within this fraction of the range of the range's end.
TRIGGER_TOLERANCE = 0.1
#: Share of a candidate group that must carry its most common label.
TRIGGER_PURITY = 0.8
#: Share of a candidate's judged members with its label that must lose it once the window is masked.
TRIGGER_FLIP_SHARE = 0.4
#: ... and their fewest number.
TRIGGER_MIN_LOST = 3
#: Most candidate groups confirmed (largest first); bounds the cost on busy images.
MAX_TRIGGER_CANDIDATES = 32


@dataclass
class AuditReport:
    """The outcome of :func:`audit_dataset` on one client's partition.

    Attributes
    ----------
    checked : int
        Samples audited.
    flagged : int
        Samples with at least one reason.
    dropped : int
        Samples removed by :func:`apply_policy` (0 until a dropping policy is applied).
    by_reason : dict[str, int]
        Number of samples per reason, every name of :data:`REASONS` present.
    scores : np.ndarray
        (N,) float suspicion in [0, 1]: 1 for hard errors and triggers, else the
        label-consistency score.
    flagged_indices : np.ndarray
        Sorted int64 row indices of the flagged samples.
    reasons : dict[int, list[str]]
        Row index -> its reasons, for flagged rows only.
    seconds : float
        Wall time of the audit.
    threshold : float
        The score at or above which a sample was called label-inconsistent.
    notes : list[str]
        What the audit could not do on this partition, with its numbers (too few samples,
        trigger candidates left unexamined).
    not_applicable : dict[str, str]
        Check (a name of :data:`REASONS`) -> why it did not run on these data, in a sentence that
        depends only on the cause (so a task's reasons are the same on every partition, and
        :func:`log_not_applicable_once` logs them once). A check listed here flagged nothing
        because it never looked, not because the data passed it.
    """

    checked: int
    flagged: int
    dropped: int
    by_reason: dict[str, int]
    scores: np.ndarray
    flagged_indices: np.ndarray
    reasons: dict[int, list[str]]
    seconds: float
    threshold: float = 0.5
    notes: list[str] = field(default_factory=list)
    not_applicable: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, int | float]:
        """Flat counts for a Flower ``MetricRecord``: no indices, scores or data.

        Returns
        -------
        dict[str, int | float]
            ``audit-checked``, ``audit-flagged``, ``audit-dropped``, ``audit-<reason>`` for
            every reason in :data:`REASONS`, ``audit-not-applicable`` (how many checks did not
            run, see :attr:`not_applicable`; the reasons stay in the client's log) and
            ``audit-seconds``.
        """
        out: dict[str, int | float] = {
            "audit-checked": int(self.checked),
            "audit-flagged": int(self.flagged),
            "audit-dropped": int(self.dropped),
        }
        for reason in REASONS:
            out[f"audit-{reason}"] = int(self.by_reason.get(reason, 0))
        out["audit-not-applicable"] = len(self.not_applicable)
        out["audit-seconds"] = float(self.seconds)
        return out

    def write_review(self, path: str | Path, x_shape: tuple[int, ...] | None = None) -> Path:
        """Write the flagged samples for the data owner to review, locally.

        Parameters
        ----------
        path : str | Path
            Target file; ``.csv`` writes CSV (``index,score,reasons`` with reasons joined by
            ``;``), anything else JSON. Parent folders are created.
        x_shape : tuple[int, ...] | None
            Shape of the audited feature array, recorded so the owner knows which array the
            indices point into (JSON only).

        Returns
        -------
        Path
            The file written. It holds indices, scores and reasons, never feature values.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {"index": int(i), "score": round(float(self.scores[i]), 6), "reasons": list(self.reasons[int(i)])}
            for i in self.flagged_indices
        ]
        if target.suffix.lower() == ".csv":
            with target.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["index", "score", "reasons"])
                for row in rows:
                    writer.writerow([row["index"], row["score"], ";".join(row["reasons"])])
            return target
        document = {
            "checked": int(self.checked),
            "flagged": int(self.flagged),
            "dropped": int(self.dropped),
            "threshold": float(self.threshold),
            "by_reason": {k: int(v) for k, v in self.by_reason.items()},
            "x_shape": None if x_shape is None else [int(s) for s in x_shape],
            "notes": list(self.notes),
            "not_applicable": dict(self.not_applicable),
            "samples": rows,
        }
        # Strict JSON: every number here is a count or a finite score, and a parser refusing NaN reads it.
        target.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
        return target


# ---------------------------------------------------------------------------------------------
# Input checks and schema rules
# ---------------------------------------------------------------------------------------------


def _image_layout(sample_shape: tuple[int, ...], image_shape: Any) -> tuple[int, int, int] | None:
    """``image_shape`` as ``(C, H, W)``, checked against the shape of one sample.

    Accepted: ``(H, W)`` (read as ``(1, H, W)``) or ``(C, H, W)``, with samples of exactly that
    shape, flat samples of ``C * H * W`` features, or ``(H, W)`` samples when ``C == 1``. A
    channels-last ``(H, W, C)`` sample has the right size but another pixel order, so it is refused
    rather than screened in the wrong coordinates.
    """
    if image_shape is None:
        return None
    dims = tuple(image_shape)
    if len(dims) not in (2, 3) or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in dims):
        raise ValueError(f"image_shape must be (height, width) or (channels, height, width) of positive integers, "
                         f"got {image_shape}")
    channels, height, width = (int(d) for d in ((1, *dims) if len(dims) == 2 else dims))
    size = channels * height * width
    fits = (sample_shape == (channels, height, width)
            or sample_shape == (size,)
            or (channels == 1 and sample_shape == (height, width)))
    if not fits:
        raise ValueError(f"image_shape {dims} does not match samples of shape {sample_shape}: give samples of shape "
                         f"({channels}, {height}, {width}) or flat ones of {size} features")
    return channels, height, width


def _check_arguments(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    feature_range: tuple[float, float] | None,
    k: int,
    threshold: float,
) -> None:
    if x.ndim < 2:
        raise ValueError(f"x must be (N, *sample_shape) with at least 2 dimensions (one row per sample), "
                         f"got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
        raise ValueError(f"x must hold real numbers, got dtype {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"y must be 1-D with one label per sample of x ({len(x)}), got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) or y.dtype == bool):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
    if feature_range is not None:
        lo, hi = feature_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"feature_range must be finite (low, high) with low < high, got {feature_range}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")


def _schema_masks(
    x: np.ndarray, y: np.ndarray, num_classes: int, feature_range: tuple[float, float] | None
) -> dict[str, np.ndarray]:
    """Per-row boolean masks of the schema rules (no duplicates yet)."""
    finite = np.isfinite(x).all(axis=1)
    out_of_range = np.zeros(len(x), dtype=bool)
    if feature_range is not None:
        lo, hi = feature_range
        slack = 1e-6 * (hi - lo)  # float32 rounding of in-range values is not an error
        with np.errstate(invalid="ignore"):
            outside = (x < lo - slack) | (x > hi + slack)
        out_of_range = finite & outside.any(axis=1)
    y_float = y.astype(np.float64)
    label_ok = np.isfinite(y_float) & (y_float == np.round(y_float)) & (y_float >= 0) & (y_float < num_classes)
    return {"non-finite": ~finite, "out-of-range": out_of_range, "label-out-of-range": ~label_ok}


def _duplicate_masks(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact duplicates among ``rows`` (every feature equal).

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        Mask of further same-label copies, mask of members of groups with conflicting labels,
        and for every row the index of its group's first copy (itself when unique).
    """
    duplicate = np.zeros(len(x), dtype=bool)
    conflict = np.zeros(len(x), dtype=bool)
    first_copy = np.arange(len(x))
    if len(rows) < 2:
        return duplicate, conflict, first_copy
    _, group, counts = np.unique(x[rows], axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    for g in np.flatnonzero(counts > 1):
        members = rows[group == g]
        if len(np.unique(y[members])) > 1:
            conflict[members] = True
        else:
            duplicate[members[1:]] = True
            first_copy[members[1:]] = members[0]
    return duplicate, conflict, first_copy


# ---------------------------------------------------------------------------------------------
# Label consistency
# ---------------------------------------------------------------------------------------------


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)


def _threshold_ratio(probs: np.ndarray, labels: np.ndarray, ref_probs: np.ndarray, ref_labels: np.ndarray,
                     num_classes: int) -> np.ndarray:
    """Confident-learning suspicion ``1 - q_y / max q`` with ``q_c = p_c / t_c``; NaN without support.

    ``t_c`` is the mean ``p_c`` over the reference samples labelled ``c``, floored at half the
    largest ``t``.
    """
    thresholds = np.full(num_classes, np.nan)
    for c in range(num_classes):
        own = ref_probs[ref_labels == c, c]
        own = own[np.isfinite(own)]
        if len(own):
            thresholds[c] = own.mean()
    # A class made mostly of corrupted labels has a tiny threshold that would let it claim every
    # sample it weakly resembles: no threshold goes below half of the most confident class's.
    floor = max(0.5 * float(np.nanmax(thresholds, initial=0.0)), 1e-3)
    thresholds = np.where(np.isnan(thresholds), 1.0, np.maximum(thresholds, floor))
    q = probs / thresholds
    best = q.max(axis=1)
    given = q[np.arange(len(labels)), labels]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(best > 0, 1.0 - given / best, np.nan)


def _row_max(probs: np.ndarray) -> np.ndarray:
    """Largest class probability per row; NaN for rows without support (all-NaN rows)."""
    return probs.max(axis=1) if probs.shape[1] else np.full(len(probs), np.nan)


def _normalise(scores: np.ndarray) -> np.ndarray:
    """Clip class scores at 0 and scale rows to sum 1; rows without support become NaN."""
    clipped = np.clip(scores, 0.0, None)
    total = clipped.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 1e-12, clipped / total, np.nan)


def _knn_probs(d_rr: np.ndarray, d_qr: np.ndarray, y_ref: np.ndarray, num_classes: int, k: int) -> tuple[
        np.ndarray, np.ndarray]:
    """Class-prior-corrected, distance-weighted kNN class probabilities for ref (self left out) and queries.

    Each class's votes are divided by the neighbours it could supply at most, ``min(k, size)``
    (its size not counting the sample itself): three votes from a class of three count as full
    agreement, so samples of a class the partition barely holds are not out-voted by its size.
    """
    n = len(y_ref)
    counts = np.bincount(y_ref, minlength=num_classes).astype(np.float64)
    d_self = d_rr.copy()
    np.fill_diagonal(d_self, np.inf)

    def vote(d2: np.ndarray, kk: int, own_labels: np.ndarray | None) -> np.ndarray:
        if len(d2) == 0 or kk < 1:
            return np.full((len(d2), num_classes), np.nan)
        nearest = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
        dist = np.sqrt(np.take_along_axis(d2, nearest, axis=1))
        # Scale-free softening: identical points would otherwise get infinite weight.
        eps = 1e-3 * float(np.median(dist[np.isfinite(dist)])) + 1e-12 if np.isfinite(dist).any() else 1.0
        weight = np.where(np.isfinite(dist), 1.0 / (dist + eps), 0.0)
        votes = np.zeros((len(d2), num_classes))
        np.add.at(votes, (np.repeat(np.arange(len(d2)), kk), y_ref[nearest].ravel()), weight.ravel())
        available = np.broadcast_to(counts, votes.shape).copy()
        if own_labels is not None:
            available[np.arange(len(d2)), own_labels] -= 1
        return _normalise(votes / np.clip(available, 1, kk))

    return vote(d_self, min(k, n - 1), y_ref), vote(d_qr, min(k, n), None)


def _kernel_probs(d_rr: np.ndarray, d_qr: np.ndarray, y_ref: np.ndarray, num_classes: int,
                  gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Kernel ridge class probabilities: exact leave-one-out for ref, plain prediction for queries."""
    onehot = np.eye(num_classes)[y_ref]
    system = np.exp(-gamma * d_rr) + KERNEL_RIDGE * np.eye(len(y_ref))
    factor = cho_factor(system)
    inverse = cho_solve(factor, np.eye(len(y_ref)))
    alpha = inverse @ onehot
    leave_one_out = onehot - alpha / np.diag(inverse)[:, None]
    return _normalise(leave_one_out), _normalise(np.exp(-gamma * d_qr) @ alpha)


def _model_probs(z_ref: np.ndarray, y_ref: np.ndarray, z_query: np.ndarray, num_classes: int,
                 model_fn: Callable[[], Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities of a user model for ref (5 folds), a full fit for queries."""

    def fit_predict(train: np.ndarray, z_out: np.ndarray) -> np.ndarray:
        out = np.zeros((len(z_out), num_classes))
        if len(z_out) == 0:
            return out
        model = model_fn()
        labels = y_ref[train]
        if len(np.unique(labels)) < 2:  # one class: the model has nothing to tell apart
            out[:, labels[0]] = 1.0
            return out
        model.fit(z_ref[train], labels)
        out[:, np.asarray(model.classes_, dtype=np.int64)] = model.predict_proba(z_out)
        return out

    ref_probs = np.zeros((len(y_ref), num_classes))
    folds = KFold(n_splits=min(5, len(y_ref)), shuffle=True, random_state=seed)
    for train, held in folds.split(z_ref):
        ref_probs[held] = fit_predict(train, z_ref[held])
    return _normalise(ref_probs), _normalise(fit_predict(np.arange(len(y_ref)), z_query))


def _suspicion(z: np.ndarray, y: np.ndarray, ref: np.ndarray, query: np.ndarray, num_classes: int, k: int,
               model_fn: Callable[[], Any] | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Label-consistency scores of the ``ref`` rows (each left out of its own judgement) and ``query`` rows."""
    z_ref, y_ref, z_query = z[ref], y[ref], z[query]
    d_rr = _squared_distances(z_ref, z_ref)
    d_qr = _squared_distances(z_query, z_ref)
    knn_ref, knn_query = _knn_probs(d_rr, d_qr, y_ref, num_classes, k)
    if model_fn is None:
        spread = float(z_ref.var()) * z_ref.shape[1]
        gamma = KERNEL_SCALE / spread if spread > 0 else 1.0
        model_ref, model_query = _kernel_probs(d_rr, d_qr, y_ref, num_classes, gamma)
    else:
        model_ref, model_query = _model_probs(z_ref, y_ref, z_query, num_classes, model_fn, seed)

    support = np.bincount(y_ref, minlength=num_classes)
    out = []
    judgements = ((y_ref, knn_ref, model_ref, 1), (y[query], knn_query, model_query, 0))
    for labels, knn, model, own in judgements:
        s_knn = _threshold_ratio(knn, labels, knn_ref, y_ref, num_classes)
        s_model = _threshold_ratio(model, labels, model_ref, y_ref, num_classes)
        # Both judges must doubt the label; a judge with no support for any class abstains.
        score = np.nan_to_num(np.fmin(s_knn, s_model), nan=0.0)
        # A label its class barely supports cannot be checked against its class: flag it only when
        # both judges firmly place the sample in one (other) class.
        checkable = support[labels] - own >= MIN_CLASS_SUPPORT
        claim = np.fmin(_row_max(knn), _row_max(model))
        score = np.where(checkable, score, np.nan_to_num(claim, nan=0.0))
        out.append(np.clip(score, 0.0, 1.0))
    return out[0], out[1]


def _consistency_scores(z: np.ndarray, y: np.ndarray, rows: np.ndarray, num_classes: int, k: int,
                        threshold: float, model_fn: Callable[[], Any] | None, seed: int) -> np.ndarray:
    """Two-pass label-consistency scores of ``rows``, judged in random blocks of at most BLOCK_SIZE."""
    scores = np.zeros(len(y))
    if len(rows) < MIN_SAMPLES:
        return scores
    num_blocks = math.ceil(len(rows) / BLOCK_SIZE)
    shuffled = np.random.default_rng(seed).permutation(rows) if num_blocks > 1 else rows
    for block in np.array_split(shuffled, num_blocks):
        first, _ = _suspicion(z, y, block, block[:0], num_classes, k, model_fn, seed)
        trusted = block[first < threshold]
        suspects = block[first >= threshold]
        if len(trusted) < MIN_SAMPLES:  # too little left to judge against: keep the first pass
            scores[block] = first
            continue
        scores[trusted], scores[suspects] = _suspicion(z, y, trusted, suspects, num_classes, k, model_fn, seed)
    return scores


# ---------------------------------------------------------------------------------------------
# Trigger screening
# ---------------------------------------------------------------------------------------------


def _min_trigger_group(num_rows: int) -> int:
    """Fewest samples a trigger group must have: 3, or 1% of a large partition."""
    return max(3, math.ceil(0.01 * num_rows))


def _trigger_candidates(x: np.ndarray, y: np.ndarray, rows: np.ndarray, image_shape: tuple[int, int, int],
                        lo: float, hi: float) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Groups sharing an atypical extreme-valued patch with one dominant label.

    A window is a ``side x side`` square of the H x W plane taken through every channel, so a
    pattern is ``C * side * side`` bits (a white patch on all channels, a red one, a checkerboard
    on one channel over black on the others are all fixed binary patterns).

    Returns
    -------
    list[tuple[np.ndarray, np.ndarray, int]]
        (member rows, flat feature indices of the union of their windows on every channel,
        dominant label), largest groups first, one entry per distinct member set.
    """
    channels, height, width = image_shape
    span = hi - lo
    images = x[rows].reshape(len(rows), channels, height, width)
    at_high = images >= hi - TRIGGER_TOLERANCE * span
    extreme = at_high | (images <= lo + TRIGGER_TOLERANCE * span)
    at_low = extreme & ~at_high
    # A pixel is atypical far from the partition's median there (on digits: ink on a black
    # background), or at an extreme that fewer than half the samples share there (on colour
    # images, whose medians sit mid-range, a white patch is only half the range from them).
    shared_high = at_high.mean(axis=0) >= 0.5
    shared_low = at_low.mean(axis=0) >= 0.5
    rare_extreme = (at_high & ~shared_high) | (at_low & ~shared_low)
    atypical = (np.abs(images - np.median(images, axis=0)) >= 0.5 * span) | rare_extreme
    min_group = _min_trigger_group(len(rows))
    groups: dict[bytes, tuple[np.ndarray, set[int], int]] = {}
    for side in TRIGGER_SIDES:
        if side > height or side > width:
            continue
        window = (side, side)
        bits_per_window = channels * side * side
        all_extreme = _window_sum(extreme, side) == bits_per_window
        candidate = all_extreme & (_window_sum(atypical, side) * 2 >= bits_per_window)
        sample, top, left = np.nonzero(candidate)
        if len(sample) == 0:
            continue
        # The pattern of each candidate window, channel by channel, row by row; read most
        # significant bit first, so that sorting the keys orders patterns as binary numbers.
        windows = np.lib.stride_tricks.sliding_window_view(at_high, window, axis=(2, 3))
        bits = windows[sample, :, top, left].reshape(len(sample), bits_per_window)
        keys = np.concatenate([top[:, None], left[:, None], bits[:, ::-1].astype(np.int64)], axis=1)
        unique_keys, which, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        which = which.reshape(-1)
        for g in np.flatnonzero(counts >= min_group):
            members = rows[np.sort(sample[which == g])]
            labels, label_counts = np.unique(y[members], return_counts=True)
            if label_counts.max() < TRIGGER_PURITY * len(members):
                continue
            top_g, left_g = int(unique_keys[g, 0]), int(unique_keys[g, 1])
            pixels = {(ch * height + top_g + r) * width + left_g + c
                      for ch in range(channels) for r in range(side) for c in range(side)}
            key = members.tobytes()
            if key in groups:
                groups[key][1].update(pixels)
            else:
                groups[key] = (members, pixels, int(labels[label_counts.argmax()]))
    ordered = sorted(groups.values(), key=lambda g: -len(g[0]))
    return [(members, np.array(sorted(pixels)), label) for members, pixels, label in ordered]


def _window_sum(mask: np.ndarray, side: int) -> np.ndarray:
    """(n, H - side + 1, W - side + 1) count of true entries of (n, C, H, W) ``mask`` in every
    ``side x side`` window through all channels (a summed-area table: no window is materialised)."""
    table = np.zeros((mask.shape[0], mask.shape[2] + 1, mask.shape[3] + 1), dtype=np.int64)
    table[:, 1:, 1:] = mask.sum(axis=1, dtype=np.int64).cumsum(axis=1).cumsum(axis=2)
    return (table[:, side:, side:] - table[:, :-side, side:] - table[:, side:, :-side]
            + table[:, :-side, :-side])


def _confirmed_triggers(x: np.ndarray, y: np.ndarray, rows: np.ndarray, trusted: np.ndarray,
                        image_shape: tuple[int, int, int], lo: float, hi: float, num_classes: int, k: int,
                        threshold: float, model_fn: Callable[[], Any] | None, seed: int) -> tuple[np.ndarray, int]:
    """Mask of the samples in confirmed trigger groups, and the number of candidates examined."""
    flagged = np.zeros(len(y), dtype=bool)
    candidates = _trigger_candidates(x, y, rows, image_shape, lo, hi)[:MAX_TRIGGER_CANDIDATES]
    rng = np.random.default_rng(seed)
    for members, pixels, label in candidates:
        if flagged[members].all():
            continue
        others = np.setdiff1d(trusted, members)
        if len(others) > TRIGGER_REFERENCE:
            others = rng.choice(others, TRIGGER_REFERENCE, replace=False)
        if len(others) < MIN_SAMPLES:
            continue
        # Members judged together stay in the reference set, so that a natural pattern (a style of
        # writing class c) keeps the examples of that style. They are at most a tenth of the
        # reference: stamped samples of the same true class then rarely meet and vouch for each
        # other, while their true class has plenty of examples among the others.
        judged = members
        most_judged = max(len(others) // TRIGGER_MEMBER_RATIO, TRIGGER_MIN_LOST)
        if len(members) > most_judged:
            judged = rng.choice(members, most_judged, replace=False)
        reference = np.union1d(others, judged)
        keep = np.setdiff1d(np.arange(x.shape[1]), pixels)
        local = np.arange(len(reference))  # the reference rows alone, masked: no copy of the whole partition
        masked, _ = _suspicion(x[reference][:, keep], y[reference], local, local[:0], num_classes, k, model_fn, seed)
        lost_label = masked[(y[reference] == label) & np.isin(reference, judged)] >= threshold
        # A count as well as a share: two odd members of a tiny natural group prove nothing.
        if lost_label.sum() >= TRIGGER_MIN_LOST and lost_label.mean() >= TRIGGER_FLIP_SHARE:
            flagged[members] = True
    return flagged, len(candidates)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def audit_dataset(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    image_shape: tuple[int, int] | tuple[int, int, int] | None = None,
    feature_range: tuple[float, float] | None = (0.0, 1.0),
    k: int = 10,
    threshold: float = 0.5,
    model_fn: Callable[[], Any] | None = None,
    seed: int = 0,
) -> AuditReport:
    """Audit one client's training data for corruption, locally.

    Parameters
    ----------
    x : np.ndarray
        (N, *sample_shape) real features: (N, F) rows, (N, C, H, W) images, any sample shape.
        Every check but the trigger screen sees each sample as its flat ``prod(sample_shape)``
        features.
    y : np.ndarray
        (N,) class labels.
    num_classes : int
        Number of classes; valid labels are ``0 .. num_classes - 1``.
    image_shape : tuple[int, int] | tuple[int, int, int] | None
        ``(C, H, W)``, or ``(H, W)`` meaning ``(1, H, W)``, when each sample is an image: samples
        of that shape, or flat samples of ``C * H * W`` features in that (channels-first) order.
        Enables trigger screening; None leaves it in :attr:`AuditReport.not_applicable`.
    feature_range : tuple[float, float] | None
        Valid range of every feature; None (a task that declares none) leaves the range rule in
        :attr:`AuditReport.not_applicable` (trigger screening then uses the observed minimum and
        maximum).
    k : int
        Neighbours in the kNN vote.
    threshold : float
        Label-consistency score at or above which a sample is flagged, in (0, 1].
    model_fn : Callable[[], Any] | None
        Optional factory of a fresh scikit-learn-style classifier (``fit``, ``predict_proba``,
        ``classes_``) whose 5-fold out-of-fold probabilities replace the kernel classifier. It is
        given the flat samples.
    seed : int
        Seed of the block split (large partitions) and of ``model_fn``'s folds.

    Returns
    -------
    AuditReport
        Scores, flags and reasons per sample (row ``i`` is ``x[i]``); see the module docstring
        for every rule.

    Raises
    ------
    ValueError
        For arrays of the wrong shape or dtype, an ``image_shape`` the samples do not have, or
        impossible parameters.
    """
    started = time.perf_counter()
    x = np.asarray(x)
    y = np.asarray(y)
    _check_arguments(x, y, num_classes, feature_range, k, threshold)
    image = _image_layout(tuple(int(s) for s in x.shape[1:]), image_shape)
    rows = x.reshape(len(x), math.prod(x.shape[1:]))  # C-order: a (C, H, W) sample flattens to the channels-first order
    # The matrices are small and clients run side by side: a multi-threaded BLAS only contends
    # for the cores (measured: 35 ms single-threaded against seconds on a busy 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        report = _audit(rows, y, num_classes, image, feature_range, k, threshold, model_fn, seed)
    report.seconds = time.perf_counter() - started
    return report


def _audit(x: np.ndarray, y: np.ndarray, num_classes: int, image_shape: tuple[int, int, int] | None,
           feature_range: tuple[float, float] | None, k: int, threshold: float,
           model_fn: Callable[[], Any] | None, seed: int) -> AuditReport:
    """The checks of :func:`audit_dataset` on validated (N, F) rows (``seconds`` left at 0)."""
    num_rows = len(x)
    not_applicable: dict[str, str] = {}
    if feature_range is None:
        not_applicable["out-of-range"] = "the task declares no feature range"
    masks = _schema_masks(x, y, num_classes, feature_range)
    labelled = ~(masks["non-finite"] | masks["label-out-of-range"])
    y_int = np.where(masks["label-out-of-range"], 0, np.nan_to_num(y.astype(np.float64))).astype(np.int64)
    masks["duplicate"], masks["duplicate-conflict"], first_copy = _duplicate_masks(x, y_int, np.flatnonzero(labelled))
    hard = np.zeros(num_rows, dtype=bool)
    for reason in HARD_REASONS:
        hard |= masks[reason]
    usable = np.flatnonzero(~hard & ~masks["duplicate"])

    z = x.astype(np.float64)
    if image_shape is None and len(usable):
        # Tabular features on different scales would let one feature decide every distance.
        mean, std = z[usable].mean(axis=0), z[usable].std(axis=0)
        z = np.where(np.isfinite(z), (z - mean) / np.where(std > 0, std, 1.0), 0.0)
    z[~np.isfinite(z)] = 0.0
    label_scores = _consistency_scores(z, y_int, usable, num_classes, k, threshold, model_fn, seed)
    masks["label-inconsistent"] = np.zeros(num_rows, dtype=bool)
    masks["label-inconsistent"][usable] = label_scores[usable] >= threshold

    notes: list[str] = []
    masks["trigger"] = np.zeros(num_rows, dtype=bool)
    if image_shape is None:
        not_applicable["trigger"] = "samples are not images (no image_shape)"
    elif min(image_shape[1:]) < min(TRIGGER_SIDES):
        not_applicable["trigger"] = f"images are smaller than the smallest trigger window ({min(TRIGGER_SIDES)} pixels)"
    if len(usable) < MIN_SAMPLES:
        notes.append(f"only {len(usable)} usable samples: label consistency and triggers not judged")
        for check in ("label-inconsistent", "trigger"):
            not_applicable.setdefault(check, f"fewer than {MIN_SAMPLES} usable samples")
    elif "trigger" not in not_applicable:
        # Without a declared range, the observed one; at least MIN_SAMPLES distinct usable rows
        # (copies are not usable) make it non-empty.
        lo, hi = feature_range if feature_range is not None else (float(x[usable].min()), float(x[usable].max()))
        trusted = usable[label_scores[usable] < threshold]
        masks["trigger"], examined = _confirmed_triggers(
            z, y_int, usable, trusted, image_shape, lo, hi, num_classes, k, threshold, model_fn, seed)
        if examined == MAX_TRIGGER_CANDIDATES:
            notes.append(f"trigger screening stopped after {examined} candidate groups")

    scores = label_scores[first_copy]
    scores[hard | masks["trigger"]] = 1.0
    reasons: dict[int, list[str]] = {}
    for reason in REASONS:
        for i in np.flatnonzero(masks[reason]):
            reasons.setdefault(int(i), []).append(reason)
    flagged_indices = np.array(sorted(reasons), dtype=np.int64)
    return AuditReport(
        checked=num_rows,
        flagged=len(flagged_indices),
        dropped=0,
        by_reason={reason: int(masks[reason].sum()) for reason in REASONS},
        scores=scores,
        flagged_indices=flagged_indices,
        reasons=reasons,
        seconds=0.0,
        threshold=float(threshold),
        notes=notes,
        not_applicable={check: not_applicable[check] for check in REASONS if check in not_applicable},
    )


def apply_policy(x: np.ndarray, y: np.ndarray, report: AuditReport, policy: str,
                 review_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decide what trains, given an audit of ``(x, y)``.

    Parameters
    ----------
    x, y : np.ndarray
        The audited arrays (same rows, same order as given to :func:`audit_dataset`).
    report : AuditReport
        Their audit. Its ``dropped`` count is updated to the number of rows removed.
    policy : str
        ``report`` trains on everything; ``drop`` removes the flagged rows; ``drop-and-review``
        also writes the review file (:meth:`AuditReport.write_review`) to ``review_path``.
    review_path : str | Path | None
        Where the review file goes; required by ``drop-and-review``.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        The features and labels to train on.

    Raises
    ------
    ValueError
        For an unknown policy, a report of another length, or ``drop-and-review`` without
        ``review_path``.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown data-audit policy {policy!r}: use one of {POLICIES}")
    if len(x) != report.checked or len(y) != report.checked:
        raise ValueError(f"the report audited {report.checked} rows, got x with {len(x)} and y with {len(y)}")
    if policy == "drop-and-review" and review_path is None:
        raise ValueError("policy 'drop-and-review' needs review_path for the review file")
    if policy == "report":
        report.dropped = 0
        return x, y
    keep = np.ones(len(x), dtype=bool)
    keep[report.flagged_indices] = False
    report.dropped = int((~keep).sum())
    if policy == "drop-and-review":
        report.write_review(review_path, x_shape=tuple(np.shape(x)))  # type: ignore[arg-type]
    return x[keep], y[keep]


#: The (check, reason) sets already logged by :func:`log_not_applicable_once` in this process.
_LOGGED_NOT_APPLICABLE: set[frozenset[tuple[str, str]]] = set()
_LOGGED_LOCK = threading.Lock()


def log_not_applicable_once(report: AuditReport, logger: logging.Logger, level: int = logging.INFO) -> bool:
    """Log the checks that did not apply to the audited data, once per process for each set.

    The ClientApp audits every round; a task without a feature range or with non-image samples
    gives the same reasons each time, so they are said once (keyed by the set of checks and
    reasons), and again only when the set changes (a partition too small to judge, say).

    Parameters
    ----------
    report : AuditReport
        An audit; nothing is logged when its :attr:`~AuditReport.not_applicable` is empty.
    logger : logging.Logger
        Where the line goes (the ClientApp passes Flower's logger).
    level : int
        Logging level of the line.

    Returns
    -------
    bool
        True when this call wrote the line.
    """
    if not report.not_applicable:
        return False
    key = frozenset(report.not_applicable.items())
    with _LOGGED_LOCK:
        if key in _LOGGED_NOT_APPLICABLE:
            return False
        _LOGGED_NOT_APPLICABLE.add(key)
    checks = "; ".join(f"{check}: {reason}" for check, reason in report.not_applicable.items())
    logger.log(level, "data audit: %d check(s) did not apply to this data and flagged nothing: %s",
               len(report.not_applicable), checks)
    return True
