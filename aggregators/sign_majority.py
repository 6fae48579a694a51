"""Sign majority vote (``signsgd-majority``)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from aggregators.base import (
    AggregationResult,
    check_max_chunk_bytes,
    chunk_budget,
    column_chunks,
    validate_updates,
)
from aggregators.registry import register


@register("signsgd-majority")
class SignMajority:
    """Majority vote on signs (signSGD with majority vote, Bernstein et al., ICLR 2019).

    Output: ``scale * sign(sum_i sign(x_i))`` coordinate-wise (0 on a tie). With ``scale=None``
    the scale is the median over rows of the row's mean absolute value, so the output has the
    magnitude of a typical update; a server applying its own step size passes ``scale=1``.
    Ignores ``weights``. Takes no f.

    Scores: fraction of the row's coordinates whose sign disagrees with a non-tied majority.
    ``selected``: all rows (every row votes).

    Parameters
    ----------
    scale : float or None
        Magnitude of the output coordinates.
    max_chunk_bytes : int or None
        Bound on temporaries per column chunk. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = False

    def __init__(self, scale: Optional[float] = None, max_chunk_bytes: Optional[int] = None) -> None:
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"signsgd-majority: scale must be a positive number or None, got {scale!r}")
        self.scale = None if scale is None else float(scale)
        self.max_chunk_bytes = check_max_chunk_bytes("signsgd-majority", max_chunk_bytes)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("signsgd-majority", updates)
        n, d = updates.shape
        vote = torch.empty(d, dtype=updates.dtype, device=updates.device)
        disagreements = torch.zeros(n, dtype=torch.float64, device=updates.device)
        abs_sum = torch.zeros(n, dtype=torch.float64, device=updates.device)
        for cols in column_chunks(n, d, 12, budget):
            signs = torch.sign(updates[:, cols])
            # Sums of n values in {-1, 0, 1} are exact in the input float dtype for n < 2^24.
            majority = torch.sign(signs.sum(dim=0))
            vote[cols] = majority
            disagreements += ((signs != majority) & (majority != 0)).sum(dim=1, dtype=torch.float64)
            if self.scale is None:
                abs_sum += updates[:, cols].abs().sum(dim=1, dtype=torch.float64)
        scale = self.scale if self.scale is not None else float((abs_sum / d).median())
        vector = vote * scale
        return AggregationResult(vector, disagreements / d, torch.ones(n, dtype=torch.bool, device=updates.device))
