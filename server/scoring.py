"""Per-client anomaly scores of one round, and how well they found the known attackers.

Every round the server compares each client's update with its peers' on five features:

============ ============================================== =========================
feature      what                                           suspicious direction
============ ============================================== =========================
norm         L2 norm of the update                          high
cosine       cosine similarity to the round's aggregate     low
distance     Euclidean distance to the round's aggregate    high
rule         the aggregation rule's own per-client score    high
log norm     log of the L2 norm                             low
============ ============================================== =========================

Each feature becomes a robust z-score over the round's clients (median and MAD, see
:func:`robust_z`), oriented so that a positive value points the suspicious way (``norm_z`` and
``log_norm_z`` stay signed). They are read as three independent kinds of evidence:

    too_large  = max(norm_z, distance_z, rule_z, 0)     the update is bigger / farther than its peers'
    misaligned = max(cosine_z, 0)                       it points elsewhere than the aggregate
    too_small  = max(-log_norm_z, 0)                    its norm is a small fraction of its peers'
    evidence   = sqrt(too_large^2 + misaligned^2 + too_small^2)
    combined   = 1 - 2 ** (-max(0, evidence - z_onset) / (z_half - z_onset))

With the defaults ``z_onset = 4.5`` and ``z_half = 6.5``: evidence up to 4.5 gives exactly 0;
``combined >= 0.5`` exactly when the evidence is at least 6.5 robust standard deviations; 8.5
gives 0.75 and the score tends to 1 (sign-flip, scaling and noise attackers typically land at 10
sd or more).

Why this shape (measured in ``benchmarks/false_flags.py`` on digits with Dirichlet label skew,
documented in docs/results.md). Under label skew an honest client's update size follows its data
size and label mix, so the three size features (norm, distance, and the trimmed-fraction or
distance score of most rules) put the same few honest clients 4.5-8 robust sd out round after
round: with the former score, the maximum of the four z-scores against 4.5, 1.9-2.5% of honest
(node, round) pairs were flagged with no attacker present, most of them the same two or three
clients, which quarantine then kept out. Those clients are out on one kind of evidence only.
The blatant attacks are out on size by far more (scaling, sign-flip, noise: 10-400 sd) or on two
kinds at once: IPM's rows point against the aggregate *and* are a tenth of the honest norm, which
a linear norm z cannot show (a norm cannot go below 0, so a small norm is at most
``median / scale`` sd out) but the log norm does. Adding the kinds in quadrature and moving the
threshold from 4.5 to 6.5 sd cut the honest flags 2.5-5 fold while IPM's recall at alpha 0.1 rose
(0.85 -> 0.98) and every blatant attack kept AUROC >= 0.99.

Under purely honest IID rounds (Gaussian client noise) the evidence passes 6.5 in well under
0.1% of client-rounds. It is a per-round, relative score: it says how unlike its peers a client
was this round, not whether it is malicious.

With fewer than three clients no client can be singled out (two disagreeing clients are
symmetric), so every z-score and combined score is 0 for ``n <= 2``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: MAD -> standard deviation of a normal distribution.
MAD_TO_SD = 1.4826
#: Mean absolute deviation -> standard deviation (used when the MAD is 0, Iglewicz & Hoaglin).
MEAN_AD_TO_SD = 1.2533
#: Default relative floor on the MAD: spreads below 0.1% of |median| are treated as noise.
DEFAULT_REL_FLOOR = 1e-3
#: Default absolute floor on the MAD (feature units).
DEFAULT_ABS_FLOOR = 1e-12
#: Features in the order they appear in rows, CSV columns and reports.
FEATURES = ("norm_z", "cosine_z", "distance_z", "rule_z", "log_norm_z")
#: Raw (un-normalised) values reported next to the z-scores as evidence.
RAW_FEATURES = ("norm", "cosine", "distance")
#: Largest evidence (robust sd) with a combined score of exactly 0.
DEFAULT_Z_ONSET = 3.0
#: Evidence with a combined score of 0.5 (so a flag threshold of 0.5 means "evidence >= 6.5 sd").
DEFAULT_Z_HALF = 6.5
#: Floor on the spread of log norms: norms within 0.1% of each other are alike.
LOG_NORM_FLOOR = 0.3
#: A zero norm is scored as this fraction of the median norm (log 0 has no finite z).
ZERO_NORM_FRACTION = 1e-12
#: Fewest clients for which scores are computed (below it everything is 0).
MIN_CLIENTS_TO_SCORE = 3
#: Bound on the float64 temporaries of one chunk of rows (number of elements).
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ClientScores:
    """Anomaly evidence for the n clients of one round (all tensors ``(n,)`` float64).

    Attributes
    ----------
    norm_z : torch.Tensor
        Signed robust z of the update norm (positive: larger than peers). Its positive part
        is evidence that the update is too large.
    cosine_z : torch.Tensor
        Negated robust z of the cosine to the aggregate (positive: less aligned than peers).
    distance_z : torch.Tensor
        Robust z of the distance to the aggregate (positive: farther than peers).
    rule_z : torch.Tensor
        Robust z of the aggregation rule's score (positive: more suspicious); zeros when the
        rule gave no scores or constant ones.
    combined : torch.Tensor
        In ``[0, 1]``, higher = more anomalous (formula in the module docstring).
    norm, cosine, distance : torch.Tensor
        The raw feature values the z-scores came from.
    log_norm_z : torch.Tensor
        Signed robust z of the log norm (negative: a small fraction of the peers' norms). Its
        negative part is evidence that the update is too small.
    evidence : torch.Tensor
        The three kinds of evidence added in quadrature (robust sd, >= 0; module docstring).
    """

    norm_z: torch.Tensor
    cosine_z: torch.Tensor
    distance_z: torch.Tensor
    rule_z: torch.Tensor
    combined: torch.Tensor
    norm: torch.Tensor
    cosine: torch.Tensor
    distance: torch.Tensor
    log_norm_z: torch.Tensor
    evidence: torch.Tensor

    def as_rows(self, node_ids: list[int]) -> list[dict]:
        """One plain dict per client: ``node_id``, the raw features, the z-scores and the evidence.

        Parameters
        ----------
        node_ids : list[int]
            Node id of each row, in the order the updates were stacked.

        Returns
        -------
        list[dict]
            ``{"node_id", "norm", "cosine", "distance", "norm_z", "cosine_z", "distance_z",
            "rule_z", "log_norm_z", "evidence"}`` with Python ints and floats (JSON- and
            CSV-ready). ``combined`` is not repeated here; it is ``self.combined``.

        Raises
        ------
        ValueError
            If the number of node ids differs from the number of scored clients.
        """
        n = int(self.combined.shape[0])
        if len(node_ids) != n:
            raise ValueError(f"as_rows: got {len(node_ids)} node ids for {n} scored clients")
        names = RAW_FEATURES + FEATURES + ("evidence",)
        columns = {name: getattr(self, name).detach().cpu().tolist() for name in names}
        return [{"node_id": int(node_id), **{name: float(columns[name][i]) for name in columns}}
                for i, node_id in enumerate(node_ids)]


def robust_z(values: torch.Tensor, *, rel_floor: float = DEFAULT_REL_FLOOR,
             abs_floor: float = DEFAULT_ABS_FLOOR) -> torch.Tensor:
    """Robust z-scores ``(x - median) / scale`` of a 1-D tensor, in float64.

    ``scale = max(1.4826 * MAD, rel_floor * |median|, abs_floor)``, where MAD is the median
    absolute deviation from the median (for normal data ``1.4826 * MAD`` estimates the standard
    deviation). When the MAD is 0 (more than half the values equal) ``1.2533 * mean absolute
    deviation`` stands in for it, so a minority of distinct values still gets a finite scale.
    The floors keep identical or nearly identical values (differences at rounding level) from
    producing huge z-scores: identical values give zeros, never inf or NaN.

    The median and MAD are taken over the finite entries; ``+-inf`` entries get ``+-inf`` and
    NaN entries get NaN (with no finite entry at all, infinite entries get 0).

    Parameters
    ----------
    values : torch.Tensor
        1-D tensor, any real dtype and device.
    rel_floor : float
        Floor on the MAD relative to ``|median|``.
    abs_floor : float
        Absolute floor on the MAD, in the units of ``values``; must be > 0.

    Returns
    -------
    torch.Tensor
        Same shape and device as ``values``, float64.

    Raises
    ------
    ValueError
        If ``values`` is not 1-D or a floor is negative (``abs_floor`` must be positive).
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"robust_z: values must be a 1-D tensor, got {shape}")
    if not (rel_floor >= 0 and abs_floor > 0):
        raise ValueError(f"robust_z: need rel_floor >= 0 and abs_floor > 0, got {rel_floor}, {abs_floor}")
    x = values.detach().to(torch.float64)
    z = torch.zeros_like(x)
    finite = torch.isfinite(x)
    if not bool(finite.any()):
        return torch.where(torch.isnan(x), x, z)
    xf = x[finite]
    median = torch.quantile(xf, 0.5)
    deviation = (xf - median).abs()
    mad = torch.quantile(deviation, 0.5)
    spread = MAD_TO_SD * mad if float(mad) > 0 else MEAN_AD_TO_SD * deviation.mean()
    scale = torch.clamp(torch.clamp(spread, min=rel_floor * float(median.abs())), min=abs_floor)
    z[finite] = (xf - median) / scale
    # Infinite values are infinitely far out; NaN carries no information and stays NaN.
    z[~finite] = x[~finite]
    return z


def score_updates(updates: torch.Tensor, aggregate: torch.Tensor, rule_scores: torch.Tensor | None = None, *,
                  z_onset: float = DEFAULT_Z_ONSET, z_half: float = DEFAULT_Z_HALF,
                  max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
                  norms: torch.Tensor | None = None, distances: torch.Tensor | None = None) -> ClientScores:
    """Score how anomalous each client's update is relative to the round's other updates.

    Parameters
    ----------
    updates : torch.Tensor
        ``(n, d)`` floating stack of client updates, any device; every value finite.
    aggregate : torch.Tensor
        ``(d,)`` the round's aggregate, finite.
    rule_scores : torch.Tensor | None
        ``(n,)`` the aggregation rule's per-client scores (higher = more suspicious), or None.
        Ignored when constant. NaN entries carry no evidence (``rule_z`` 0); ``+inf`` counts as
        infinitely suspicious.
    z_onset : float
        Largest evidence at which ``combined`` is still 0.
    z_half : float
        Evidence at which ``combined`` reaches 0.5 (the flagging threshold's meaning).
    max_chunk_elements : int
        Rows are processed in chunks of at most this many elements, bounding the float64
        temporaries (norms, dot products and distances are accumulated in float64). On CPU
        (float32/float64 stacks) the features come from one read of the stack in cache-sized
        float64 blocks (:func:`server.stacking.row_features`) and this bound does not apply.
    norms : torch.Tensor | None
        ``(n,)`` the rows' L2 norms when the caller already has them (float64, e.g. from
        stacking the updates); they are then not measured again. Trusted as given.
    distances : torch.Tensor | None
        ``(n,)`` the rows' Euclidean distances to ``aggregate`` when the caller already has them
        (a rule whose scores are those distances, ``scores_are_distances``). With ``norms`` too,
        the stack is not read at all: the dot products come from
        ``(|u|^2 + |a|^2 - |u - a|^2) / 2`` in float64, whose error is about 1e-16 (|u|^2 + |a|^2),
        i.e. a cosine within ~1e-16 (|u| / |a| + |a| / |u|) of the measured one. Trusted as given;
        ignored unless every norm and distance is finite.

    Returns
    -------
    ClientScores
        Float64 tensors on the device of ``updates``. All z-scores and combined scores are 0
        when ``n <= 2`` (see the module docstring).

    Raises
    ------
    ValueError
        On wrong shapes or dtypes, non-finite updates or aggregate (naming the rows), or
        ``z_half <= z_onset``.
    """
    if (norms is not None and distances is not None and isinstance(updates, torch.Tensor) and updates.dim() == 2
            and tuple(norms.shape) == (updates.shape[0],) and tuple(distances.shape) == (updates.shape[0],)
            and bool(torch.isfinite(norms).all()) and bool(torch.isfinite(distances).all())):
        _check_inputs(updates, aggregate, rule_scores, check_rows=False)
        if max_chunk_elements < 1:
            raise ValueError(f"score_updates: max_chunk_elements must be >= 1, got {max_chunk_elements}")
        from server.stacking import all_finite

        if not all_finite(aggregate):
            raise ValueError("score_updates: aggregate contains NaN or Inf")
        _check_rule_scores(rule_scores, updates.shape[0])
        norm = norms.detach().to(torch.float64)
        distance = distances.detach().to(device=norm.device, dtype=torch.float64)
        agg = aggregate.detach().to(device=norm.device, dtype=torch.float64)
        agg_sq = torch.dot(agg, agg)
        dot = (norm * norm + agg_sq - distance * distance) / 2
        denominator = norm * agg_sq.sqrt()
        cosine = torch.where(denominator > 0, dot / torch.where(denominator > 0, denominator, 1.0), 0.0)
        return score_features(norm, cosine.clamp(-1.0, 1.0), distance, rule_scores, z_onset=z_onset, z_half=z_half)
    fast = _fast_features(updates, aggregate)
    _check_inputs(updates, aggregate, rule_scores, check_rows=not fast)
    if max_chunk_elements < 1:
        raise ValueError(f"score_updates: max_chunk_elements must be >= 1, got {max_chunk_elements}")
    if norms is not None and (not isinstance(norms, torch.Tensor) or tuple(norms.shape) != (updates.shape[0],)):
        raise ValueError(f"score_updates: norms must be a tensor of shape ({updates.shape[0]},)")
    if fast:
        from server.stacking import all_finite, row_features

        sq, dot, sq_distance = row_features(updates, aggregate, None if norms is None else norms.double() ** 2)
        # A NaN or Inf anywhere in a row makes its distance to the (finite) aggregate non-finite:
        # only those rows need the element-wise check, which names them as before.
        suspects = torch.nonzero(~(torch.isfinite(sq_distance) & torch.isfinite(dot))).flatten()
        if suspects.numel():
            finite_rows = torch.isfinite(updates[suspects]).all(dim=1)
            bad = suspects[~finite_rows].tolist()
            if bad:
                raise ValueError(f"score_updates: update rows {bad} contain NaN or Inf")
        if not all_finite(aggregate):
            raise ValueError("score_updates: aggregate contains NaN or Inf")
        _check_rule_scores(rule_scores, updates.shape[0])
        norm = sq.sqrt() if norms is None else norms.detach().to("cpu", torch.float64)
        agg_norm = torch.linalg.vector_norm(aggregate.detach().to("cpu", torch.float64))
        denominator = norm * agg_norm
        cosine = torch.where(denominator > 0, dot / torch.where(denominator > 0, denominator, 1.0), 0.0)
        norm, cosine, distance = norm, cosine.clamp(-1.0, 1.0), sq_distance.sqrt()
    else:
        norm, cosine, distance = _raw_features(updates, aggregate, max_chunk_elements)
        if norms is not None:
            norm = norms.detach().to(device=norm.device, dtype=torch.float64)
    return score_features(norm, cosine, distance, rule_scores, z_onset=z_onset, z_half=z_half)


def score_features(norm: torch.Tensor, cosine: torch.Tensor, distance: torch.Tensor,
                   rule_scores: torch.Tensor | None = None, *, z_onset: float = DEFAULT_Z_ONSET,
                   z_half: float = DEFAULT_Z_HALF) -> ClientScores:
    """The z-scores, evidence and combined scores of one round from its raw features.

    :func:`score_updates` measures the features and calls this; a stored run's features
    (``summary.json`` rounds, ``scores.csv``) can be scored again with it.

    Parameters
    ----------
    norm, cosine, distance : torch.Tensor
        ``(n,)`` each client's update norm (>= 0), cosine and distance to the aggregate.
    rule_scores : torch.Tensor | None
        As for :func:`score_updates`.
    z_onset, z_half : float
        As for :func:`score_updates`.

    Returns
    -------
    ClientScores
        Float64 tensors on the device of ``norm``.

    Raises
    ------
    ValueError
        On features of different shapes, a negative or non-finite norm, or ``z_half <= z_onset``.
    """
    if not 0.0 <= z_onset < z_half:
        raise ValueError(f"score_updates: need 0 <= z_onset < z_half, got z_onset={z_onset}, z_half={z_half}")
    norm, cosine, distance = (torch.as_tensor(x).detach().to(torch.float64) for x in (norm, cosine, distance))
    if norm.dim() != 1 or cosine.shape != norm.shape or distance.shape != norm.shape:
        raise ValueError(f"score_features: norm, cosine and distance must be (n,) alike, got "
                         f"{tuple(norm.shape)}, {tuple(cosine.shape)}, {tuple(distance.shape)}")
    if not bool((torch.isfinite(norm) & (norm >= 0)).all()):
        raise ValueError("score_features: norms must be finite and >= 0")
    n = int(norm.shape[0])
    if rule_scores is not None and tuple(rule_scores.shape) != (n,):
        raise ValueError(f"score_features: rule_scores must be a tensor of shape ({n},), got {tuple(rule_scores.shape)}")
    zeros = torch.zeros(n, dtype=torch.float64, device=norm.device)
    if n < MIN_CLIENTS_TO_SCORE:
        return ClientScores(zeros, zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone(), norm, cosine, distance,
                            zeros.clone(), zeros.clone())

    norm_z = robust_z(norm)
    cosine_z = -robust_z(cosine)
    distance_z = robust_z(distance)
    rule_z = _rule_z(rule_scores, zeros)
    log_norm_z = _log_norm_z(norm, zeros)
    too_large = torch.stack([norm_z, distance_z, rule_z]).amax(dim=0).clamp(min=0.0)
    misaligned = cosine_z.clamp(min=0.0)
    too_small = (-log_norm_z).clamp(min=0.0)
    # Independent kinds of evidence add in quadrature; one kind alone needs the full z_half.
    evidence = torch.linalg.vector_norm(torch.stack([too_large, misaligned, too_small]), dim=0)
    excess = torch.clamp(evidence - z_onset, min=0.0) / (z_half - z_onset)
    combined = 1.0 - torch.exp2(-excess)
    return ClientScores(norm_z, cosine_z, distance_z, rule_z, combined, norm, cosine, distance, log_norm_z, evidence)


def _log_norm_z(norm: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Robust z of log norms; a zero norm counts as ``ZERO_NORM_FRACTION`` of the median norm."""
    median = torch.quantile(norm, 0.5)
    if not float(median) > 0:
        return zeros.clone()  # most updates are zero: no size to be a fraction of
    # Norms are scale quantities: compare their ratios, with a floor at 0.1% relative spread.
    logs = torch.log(torch.clamp(norm, min=float(median) * ZERO_NORM_FRACTION))
    return robust_z(logs, rel_floor=0.0, abs_floor=LOG_NORM_FLOOR)


def _fast_features(updates: torch.Tensor, aggregate: torch.Tensor) -> bool:
    """Whether the one-read CPU feature pass applies (a CPU float32/float64 (n, d) stack)."""
    return (isinstance(updates, torch.Tensor) and updates.dim() == 2 and updates.device.type == "cpu"
            and updates.dtype in (torch.float32, torch.float64) and updates.is_contiguous()
            and updates.shape[0] > 0 and isinstance(aggregate, torch.Tensor)
            and tuple(aggregate.shape) == (updates.shape[1],) and aggregate.is_floating_point())


def _check_rule_scores(rule_scores: torch.Tensor | None, n: int) -> None:
    if rule_scores is not None:
        if not isinstance(rule_scores, torch.Tensor) or tuple(rule_scores.shape) != (n,):
            what = tuple(rule_scores.shape) if isinstance(rule_scores, torch.Tensor) else type(rule_scores).__name__
            raise ValueError(f"score_updates: rule_scores must be a tensor of shape ({n},), got {what}")


def _check_inputs(updates: torch.Tensor, aggregate: torch.Tensor, rule_scores: torch.Tensor | None,
                  check_rows: bool = True) -> None:
    if not isinstance(updates, torch.Tensor) or updates.dim() != 2 or not updates.is_floating_point():
        what = f"shape {tuple(updates.shape)}, dtype {updates.dtype}" if isinstance(updates, torch.Tensor) \
            else type(updates).__name__
        raise ValueError(f"score_updates: updates must be a 2-D floating tensor (n, d), got {what}")
    n, d = updates.shape
    if not isinstance(aggregate, torch.Tensor) or tuple(aggregate.shape) != (d,) or not aggregate.is_floating_point():
        what = f"shape {tuple(aggregate.shape)}, dtype {aggregate.dtype}" if isinstance(aggregate, torch.Tensor) \
            else type(aggregate).__name__
        raise ValueError(f"score_updates: aggregate must be a floating tensor of shape ({d},), got {what}")
    if check_rows:
        finite_rows = torch.isfinite(updates).all(dim=1)
        if not bool(finite_rows.all()):
            bad = torch.nonzero(~finite_rows).flatten().tolist()
            raise ValueError(f"score_updates: update rows {bad} contain NaN or Inf")
        if not bool(torch.isfinite(aggregate).all()):
            raise ValueError("score_updates: aggregate contains NaN or Inf")
        _check_rule_scores(rule_scores, n)


def _raw_features(updates: torch.Tensor, aggregate: torch.Tensor,
                  max_chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norms, cosines to the aggregate and distances to it, in float64, chunk by chunk of rows."""
    n, d = updates.shape
    agg = aggregate.detach().to(device=updates.device, dtype=torch.float64)
    agg_norm = torch.linalg.vector_norm(agg)
    norm = torch.empty(n, dtype=torch.float64, device=updates.device)
    dot = torch.empty_like(norm)
    distance = torch.empty_like(norm)
    rows_per_chunk = max(1, max_chunk_elements // max(d, 1))
    for start in range(0, n, rows_per_chunk):
        block = updates[start:start + rows_per_chunk].detach().to(torch.float64)
        norm[start:start + rows_per_chunk] = torch.linalg.vector_norm(block, dim=1)
        dot[start:start + rows_per_chunk] = block @ agg
        # Subtract, then take the norm: never |u|^2 + |a|^2 - 2 u.a, which cancels catastrophically.
        distance[start:start + rows_per_chunk] = torch.linalg.vector_norm(block - agg, dim=1)
    denominator = norm * agg_norm
    # A zero vector has no direction: its cosine to anything is defined as 0.
    cosine = torch.where(denominator > 0, dot / torch.where(denominator > 0, denominator, 1.0), 0.0)
    return norm, cosine.clamp(-1.0, 1.0), distance


def _rule_z(rule_scores: torch.Tensor | None, zeros: torch.Tensor) -> torch.Tensor:
    if rule_scores is None:
        return zeros.clone()
    scores = rule_scores.detach().to(device=zeros.device, dtype=torch.float64)
    if bool(torch.isfinite(scores).all()) and float(scores.max() - scores.min()) == 0.0:
        return zeros.clone()  # constant scores say nothing about anyone
    # NaN from the rule carries no evidence; +inf stays infinitely suspicious.
    return torch.nan_to_num(robust_z(scores), nan=0.0, posinf=math.inf, neginf=-math.inf)


# ---------------------------------------------------------------------------- run-level evaluation
def detection_quality(rounds: list[dict], malicious: set[int]) -> dict | None:
    """How well the per-round scores and flags separate the known attackers from honest nodes.

    Every (node, round) pair with a score in ``round["scores"]`` is one sample, labelled
    positive when the node is in ``malicious`` (attackers are malicious in every round they
    take part in). Rejected replies have no score and are not samples.

    - ``auroc``: probability that a random malicious pair scores higher than a random honest
      one (ties count one half), from the Mann-Whitney rank sum with tied scores given their
      average rank.
    - ``precision`` / ``recall``: over pairs too. A pair is flagged when its node is in that
      round's ``flagged`` list. ``precision`` = flagged malicious pairs / flagged pairs (None
      when nothing was flagged), ``recall`` = flagged malicious pairs / malicious pairs.

    Parameters
    ----------
    rounds : list[dict]
        Round records as in ``summary.json``: ``{"round", "scores": {node id: score},
        "flagged": [node ids], ...}``; node ids may be ints or strings.
    malicious : set[int]
        The known attackers' node ids.

    Returns
    -------
    dict | None
        ``{"auroc", "precision", "recall", "pairs", "malicious_pairs", "flagged_pairs"}``, or
        None when ``malicious`` is empty or the scored pairs are all malicious or all honest
        (AUROC undefined).

    Raises
    ------
    ValueError
        If a round record is malformed or a score is not a finite number.
    """
    malicious = {int(m) for m in malicious}
    if not malicious:
        return None
    scores: list[float] = []
    labels: list[bool] = []
    flags: list[bool] = []
    for index, record in enumerate(rounds):
        round_scores = record.get("scores") or {}
        if not isinstance(round_scores, dict):
            raise ValueError(f"detection_quality: rounds[{index}]['scores'] must be a dict, got "
                             f"{type(round_scores).__name__}")
        flagged = {_node_id(n, index, "flagged") for n in (record.get("flagged") or [])}
        for key, value in round_scores.items():
            node = _node_id(key, index, "scores")
            score = _finite_float(value, f"rounds[{index}]['scores'][{key!r}]")
            scores.append(score)
            labels.append(node in malicious)
            flags.append(node in flagged)
    positives = sum(labels)
    if positives == 0 or positives == len(labels):
        return None
    y = np.asarray(labels, dtype=bool)
    f = np.asarray(flags, dtype=bool)
    flagged_pairs = int(f.sum())
    true_positives = int((f & y).sum())
    return {
        "auroc": auroc(np.asarray(scores, dtype=np.float64), y),
        "precision": true_positives / flagged_pairs if flagged_pairs else None,
        "recall": true_positives / positives,
        "pairs": len(labels),
        "malicious_pairs": int(positives),
        "flagged_pairs": flagged_pairs,
    }


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U / (P * N)), ties averaged.

    Parameters
    ----------
    scores : np.ndarray
        1-D scores, higher = more likely positive.
    labels : np.ndarray
        1-D bool, same length, with at least one positive and one negative.

    Returns
    -------
    float
        In ``[0, 1]``; 0.5 for uninformative scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"auroc: scores and labels must be 1-D of equal length, got {scores.shape}, {labels.shape}")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("auroc: need at least one positive and one negative label")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Tied values share the average of the 1-based ranks they span.
    first_rank = np.cumsum(counts) - counts + 1
    average_rank = first_rank + (counts - 1) / 2.0
    ranks = average_rank[inverse]
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


#: Column order of scores.csv (feature columns beyond these follow, sorted).
CSV_COLUMNS = ("round", "node_id", "combined", *RAW_FEATURES, *FEATURES, "flagged", "reputation")


def write_scores_csv(rounds: list[dict], path: str | Path) -> Path:
    """Write one CSV row per scored (round, node) pair.

    Columns: ``round, node_id, combined, norm, cosine, distance, norm_z, cosine_z, distance_z,
    rule_z, flagged, reputation`` (then any other feature keys found, sorted). Features come from
    ``round["features"][node]``, the reputation from ``round["reputation"][node]``; a missing
    value is an empty cell. ``flagged`` is 1 or 0. Rows are sorted by round, then node id.

    Parameters
    ----------
    rounds : list[dict]
        Round records as in ``summary.json``.
    path : str | Path
        Where to write; parent folders are created.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        If a round record is malformed.
    """
    rows: list[dict] = []
    extra: set[str] = set()
    for index, record in enumerate(rounds):
        if not isinstance(record, dict) or "round" not in record:
            raise ValueError(f"write_scores_csv: rounds[{index}] must be a dict with a 'round' key")
        server_round = int(record["round"])
        features = record.get("features") or {}
        reputation = record.get("reputation") or {}
        flagged = {_node_id(n, index, "flagged") for n in (record.get("flagged") or [])}
        for key, value in (record.get("scores") or {}).items():
            node = _node_id(key, index, "scores")
            row = {"round": server_round, "node_id": node,
                   "combined": _finite_float(value, f"rounds[{index}]['scores'][{key!r}]"),
                   "flagged": int(node in flagged)}
            node_features = features.get(str(node), features.get(node, {})) or {}
            row.update({k: v for k, v in node_features.items() if k != "node_id"})
            extra.update(k for k in node_features if k not in CSV_COLUMNS and k != "node_id")
            rep = reputation.get(str(node), reputation.get(node))
            row["reputation"] = rep if rep is not None else ""
            rows.append(row)
    rows.sort(key=lambda r: (r["round"], r["node_id"]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*CSV_COLUMNS, *sorted(extra)], restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_scores_csv(path: str | Path) -> list[dict]:
    """Read what :func:`write_scores_csv` wrote: one dict per row, numbers parsed.

    ``round``, ``node_id`` and ``flagged`` become int (``flagged`` then bool), other non-empty
    cells float, empty cells None.

    Raises
    ------
    ValueError
        Naming the file and line when a required column is missing or a cell is not a number.
    """
    path = Path(path)
    rows: list[dict] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"round", "node_id", "combined"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        for line, raw in enumerate(reader, start=2):
            row: dict = {}
            for key, cell in raw.items():
                if key is None:
                    raise ValueError(f"{path}:{line}: more cells than columns")
                try:
                    if cell is None or cell == "":
                        row[key] = None
                    elif key in ("round", "node_id"):
                        row[key] = int(cell)
                    elif key == "flagged":
                        row[key] = bool(int(cell))
                    else:
                        row[key] = float(cell)
                except ValueError:
                    raise ValueError(f"{path}:{line}: column {key!r} holds {cell!r}, not a number") from None
            rows.append(row)
    return rows


def _node_id(value, index: int, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"rounds[{index}]['{where}']: node id {value!r} is not an integer") from None


def _finite_float(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {value!r} is not finite")
    return number
