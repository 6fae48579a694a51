"""Divide-and-Conquer (``dnc``): spectral filtering on random coordinate subsets."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from aggregators.base import (
    AggregationResult,
    check_max_chunk_bytes,
    chunk_budget,
    check_num_byzantine,
    impossible,
    validate_updates,
)
from aggregators.geometry import weighted_mean_rows
from aggregators.registry import register


@register("dnc")
class DivideAndConquer:
    """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021).

    Each of ``num_iters`` iterations samples ``subsample_dim`` coordinates (a seeded generator
    that advances every call), centres the sub-vectors, takes the top right singular vector of
    the centred stack and scores each row by its squared projection on it; the
    ``floor(filter_fraction * f)`` highest-scoring rows are dropped. The output is the mean of the
    rows kept in every iteration (if no row survives all iterations: those kept most often).
    Ignores ``weights``. Requires ``n > floor(filter_fraction * f)`` (checked at call time).

    Scores: mean over iterations of each row's projection score divided by that iteration's
    largest (in [0, 1]). ``selected``: the averaged rows.

    Parameters
    ----------
    num_byzantine : int
        f.
    num_iters : int
        Iterations (random coordinate subsets).
    subsample_dim : int
        Coordinates sampled per iteration (all of them when d is smaller).
    filter_fraction : float
        c in the paper; rows dropped per iteration = floor(c * f).
    seed : int
        Seed of the coordinate sampler.
    max_chunk_bytes : int or None
        Bound on float64 temporaries of the final mean. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = False

    def __init__(
        self,
        num_byzantine: int = 0,
        num_iters: int = 5,
        subsample_dim: int = 10_000,
        filter_fraction: float = 1.0,
        seed: int = 0,
        max_chunk_bytes: Optional[int] = None,
    ) -> None:
        self.num_byzantine = check_num_byzantine("dnc", num_byzantine)
        for name, value in (("num_iters", num_iters), ("subsample_dim", subsample_dim)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"dnc: {name} must be a positive integer, got {value!r}")
        if not (isinstance(filter_fraction, (int, float)) and math.isfinite(filter_fraction) and filter_fraction >= 0):
            raise ValueError(f"dnc: filter_fraction must be a non-negative number, got {filter_fraction!r}")
        self.num_iters = int(num_iters)
        self.subsample_dim = int(subsample_dim)
        self.filter_fraction = float(filter_fraction)
        self.seed = int(seed)
        self.max_chunk_bytes = check_max_chunk_bytes("dnc", max_chunk_bytes)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("dnc", updates)
        n, d = updates.shape
        f = self.num_byzantine
        removed = int(math.floor(self.filter_fraction * f))
        if n <= removed:
            raise impossible("dnc", n, f, f"n > floor(filter_fraction * f) = {removed}")
        kept_count = torch.zeros(n, dtype=torch.int64, device=updates.device)
        score_sum = torch.zeros(n, dtype=torch.float64, device=updates.device)
        for _ in range(self.num_iters):
            if self.subsample_dim >= d:
                columns = torch.arange(d, device=updates.device)
            else:
                columns = torch.randperm(d, generator=self.generator)[: self.subsample_dim].to(updates.device)
            sub = updates[:, columns].to(torch.float64)
            centred = sub - sub.mean(dim=0, keepdim=True)
            # Top right singular vector v via the n x n Gram matrix: (centred v)_i^2 = lambda u_i^2.
            eigenvalues, eigenvectors = torch.linalg.eigh(centred @ centred.T)
            projection_sq = eigenvalues[-1].clamp(min=0.0) * eigenvectors[:, -1].square()
            top = projection_sq.max()
            score_sum += projection_sq / top if float(top) > 0 else projection_sq
            kept = torch.ones(n, dtype=torch.bool, device=updates.device)
            if removed > 0:
                kept[torch.topk(projection_sq, removed).indices] = False
            kept_count += kept.to(torch.int64)
        selected = kept_count == kept_count.max()
        vector = torch.empty(d, dtype=updates.dtype, device=updates.device)
        coeffs = selected.to(torch.float64)
        weighted_mean_rows(updates, coeffs / coeffs.sum(), vector, budget)
        return AggregationResult(vector, score_sum / self.num_iters, selected)

    def state_dict(self) -> Dict[str, Any]:
        """The coordinate sampler's generator state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
