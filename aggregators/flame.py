"""FLAME (``flame``): cluster the updates by direction, clip to the median norm, add adaptive noise.

Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022, Algorithm 1:

1. cosine distances ``c_ij = 1 - cos(x_i, x_j)`` between all updates (float64, on the input
   device: :func:`aggregators.similarity.cosine_similarities`);
2. HDBSCAN on them with ``min_cluster_size = n // 2 + 1`` (``min_samples = 1``, a single cluster
   allowed): only a majority can form a cluster, every update outside it is an outlier;
3. ``S = median(||x_1||, ..., ||x_n||)`` over all n updates, and every admitted update clipped to
   norm ``S`` (scaled by ``min(1, S / ||x_i||)``);
4. the mean of the clipped admitted updates, plus Gaussian noise of std ``lambda * S``.

Why the majority always has at least ``n // 2 + 1`` members here: with ``min_cluster_size`` above
n/2 the condensed tree can never split in two clusters, so HDBSCAN's answer is the root cluster,
whose members are the points still together at its last split, at least ``min_cluster_size`` of
them. Should HDBSCAN ever return less (it did not on 3,000 random stacks), FLAME falls back to
admitting every update (:func:`majority_cluster`): its premise, an honest majority cluster, is
then not observable.

The rule is ``flame``; the pre-aggregation step ``flame`` (:class:`FlameFilter`) is steps 1-3
(admit and clip, no noise), so any rule can run on FLAME's admitted, clipped updates.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from sklearn.cluster import HDBSCAN
from torch import Tensor

from aggregators.base import AggregationResult, check_max_chunk_bytes, chunk_budget, validate_updates
from aggregators.geometry import weighted_mean_rows
from aggregators.registry import register, register_pre
from aggregators.similarity import cosine_similarities

#: FLAME's noise level for image classification (the paper's lambda; 0.01 for its NLP task).
DEFAULT_NOISE_LAMBDA: float = 0.001


def majority_cluster(labels: np.ndarray) -> np.ndarray:
    """The rows FLAME admits, given HDBSCAN's labels (``-1``: outlier).

    Parameters
    ----------
    labels : numpy.ndarray
        ``(n,)`` integer cluster labels.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` bool: the members of the largest cluster when it holds at least ``n // 2 + 1``
        rows; otherwise (every row an outlier, or no majority) every row.
    """
    n = labels.shape[0]
    clustered = labels[labels >= 0]
    if clustered.size > 0:
        values, counts = np.unique(clustered, return_counts=True)
        # Ties cannot reach a majority, so the lowest label among the largest is as good as any.
        largest = values[int(np.argmax(counts))]
        if int(counts.max()) >= n // 2 + 1:
            return labels == largest
    return np.ones(n, dtype=bool)


def _flame_admit_and_clip(rule: str, updates: Tensor, max_chunk_bytes: int) -> Tuple[Tensor, Tensor, float, Tensor]:
    """Steps 1-3 of FLAME: the admitted rows, their clipping factors, ``S`` and the scores.

    Returns
    -------
    (Tensor, Tensor, float, Tensor)
        ``admitted`` (n,) bool; ``factors`` (n,) float64, ``min(1, S / ||x_i||)`` on admitted rows
        and 0 elsewhere; the median norm ``S``; ``scores`` (n,) float64 (see :class:`Flame`).
    """
    validate_updates(rule, updates)
    n = updates.shape[0]
    if n < 2:
        raise ValueError(f"{rule}: needs n >= 2 updates to cluster, got n={n}")
    cosine, norms = cosine_similarities(updates, max_chunk_bytes)
    distances = (1.0 - cosine).clamp_(min=0.0, max=2.0)
    distances.fill_diagonal_(0.0)
    labels = HDBSCAN(
        min_cluster_size=n // 2 + 1, min_samples=1, allow_single_cluster=True, metric="precomputed", copy=True
    ).fit(distances.cpu().numpy()).labels_
    admitted = torch.from_numpy(majority_cluster(labels)).to(updates.device)
    ordered = torch.sort(norms).values
    median = float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)
    factors = torch.where(norms > median, median / norms.clamp(min=1e-300), torch.ones_like(norms))
    # x * factor rounded in the input dtype can exceed S by a few ulps; shrink the clipped rows by
    # a few ulps of that dtype so that ||factor * x|| <= S holds exactly (as the clip step does).
    factors = torch.where(norms > median, factors * (1 - 4 * torch.finfo(updates.dtype).eps), factors)
    factors = torch.where(admitted, factors, torch.zeros_like(factors))
    # Score of an admitted row: half its mean cosine distance to the other admitted rows, in [0, 1];
    # an outlier scores 1.
    members = admitted.to(torch.float64)
    others = (members.sum() - 1.0).clamp(min=1.0)
    spread = (distances * members[None, :]).sum(dim=1) / others / 2.0
    scores = torch.where(admitted, spread, torch.ones_like(spread))
    return admitted, factors, median, scores


@register("flame")
class Flame:
    """FLAME (Nguyen et al., USENIX Security 2022): HDBSCAN on cosine distances admits the majority
    cluster; admitted updates are clipped to the median norm S, averaged, and Gaussian noise of std
    ``noise_lambda * S`` is added. See the module notes for the steps.

    Ignores ``weights`` (the paper averages uniformly). Takes no f: the cluster must be a majority.
    Needs n >= 2. Edge cases: identical rows (all distances 0) form one cluster and are all
    admitted; a zero row is orthogonal to every non-zero row (cosine distance 1) and identical to
    other zero rows; if HDBSCAN yields no majority cluster, every row is admitted. When the median
    norm is 0 (most rows are zero), every admitted non-zero row is clipped to zero.

    Scores: 1 for rejected rows; for admitted rows half their mean cosine distance to the other
    admitted rows, in [0, 1]. ``selected``: the admitted rows.

    The noise comes from a seeded CPU generator that advances on every call with non-zero noise;
    ``state_dict`` saves it.

    Parameters
    ----------
    noise_lambda : float
        lambda in the paper: noise std over the median norm. 0.001 (the paper's value for image
        classification) by default; 0 adds no noise.
    seed : int
        Seed of the noise generator.
    max_chunk_bytes : int or None
        Bound on float64 temporaries. None: 8 MiB on CPU, 256 MiB on other devices
        (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = False

    def __init__(self, noise_lambda: float = DEFAULT_NOISE_LAMBDA, seed: int = 0, max_chunk_bytes: Optional[int] = None) -> None:
        if isinstance(noise_lambda, bool) or not (
            isinstance(noise_lambda, (int, float)) and math.isfinite(noise_lambda) and noise_lambda >= 0
        ):
            raise ValueError(f"flame: noise_lambda must be a non-negative finite number, got {noise_lambda!r}")
        self.noise_lambda = float(noise_lambda)
        self.seed = int(seed)
        self.max_chunk_bytes = check_max_chunk_bytes("flame", max_chunk_bytes)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        admitted, factors, median, scores = _flame_admit_and_clip("flame", updates, budget)
        vector = torch.empty(updates.shape[1], dtype=updates.dtype, device=updates.device)
        weighted_mean_rows(updates, factors / admitted.sum().to(torch.float64), vector, budget)
        std = self.noise_lambda * median
        if std > 0:
            noise = torch.randn(updates.shape[1], generator=self.generator, dtype=torch.float64) * std
            vector = (vector.to(torch.float64) + noise.to(updates.device)).to(updates.dtype)
        return AggregationResult(vector, scores, admitted)

    def state_dict(self) -> Dict[str, Any]:
        """The noise generator's state (a CPU uint8 tensor)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])


@register_pre("flame")
class FlameFilter:
    """FLAME's filter as a pre-aggregation step: the rows of the HDBSCAN majority cluster, each
    clipped to the median norm of all rows (steps 1-3 of :class:`Flame`, no noise).

    Gives one row per admitted update (at least ``n // 2 + 1`` of them unless HDBSCAN finds no
    majority, when all n are kept). Mixing: ``min(1, S / ||x_i||)`` at each admitted row's column,
    so the chain maps the rule's scores back to admitted clients and marks rejected clients
    unselected with the highest score. Needs n >= 2.

    Parameters
    ----------
    max_chunk_bytes : int or None
        Bound on float64 temporaries. None: 8 MiB on CPU, 256 MiB on other devices
        (:func:`aggregators.base.chunk_budget`).
    """

    def __init__(self, max_chunk_bytes: Optional[int] = None) -> None:
        self.max_chunk_bytes = check_max_chunk_bytes("flame", max_chunk_bytes)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        admitted, factors, _, _ = _flame_admit_and_clip("flame", updates, budget)
        rows = torch.nonzero(admitted).flatten()
        mixing = torch.zeros((rows.numel(), updates.shape[0]), dtype=torch.float64, device=updates.device)
        mixing[torch.arange(rows.numel(), device=updates.device), rows] = factors[rows]
        clipped = (updates[rows] * factors[rows].to(updates.dtype)[:, None]).to(updates.dtype)
        return clipped, mixing
