"""A user-defined aggregation rule loaded by import path ("custom_rule_example:MedianOfMeans")
in tests/test_aggregators_registry.py: it shows what a plug-in needs -- a callable returning
AggregationResult, with its parameters in the constructor."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from aggregators import AggregationResult


class MedianOfMeans:
    """Split the rows into ``groups`` consecutive groups, average each, take the coordinate-wise
    median of the group means. Scores: distance of each row to the output."""

    def __init__(self, groups: int = 2) -> None:
        if groups < 1:
            raise ValueError(f"median-of-means: groups must be >= 1, got {groups}")
        self.groups = groups

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        means = torch.stack([chunk.mean(dim=0) for chunk in torch.tensor_split(updates, self.groups)])
        vector = means.median(dim=0).values if self.groups % 2 else means.sort(dim=0).values[self.groups // 2 - 1 : self.groups // 2 + 1].mean(dim=0)
        scores = (updates - vector).norm(dim=1).to(torch.float64)
        return AggregationResult(vector, scores, torch.ones(updates.shape[0], dtype=torch.bool))


def make_first_row_rule() -> "FirstRow":
    """A factory (not a class) is accepted too."""
    return FirstRow()


class FirstRow:
    """Returns row 0 (a deliberately non-robust example)."""

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        selected = torch.zeros(updates.shape[0], dtype=torch.bool)
        selected[0] = True
        return AggregationResult(updates[0].clone(), (~selected).to(torch.float64), selected)


class ShrinkRows:
    """A pre-aggregation step (``"custom_rule_example:ShrinkRows:factor=0.5"``): scales every row,
    returning the new stack and its diagonal mixing matrix."""

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        n = updates.shape[0]
        return updates * self.factor, torch.eye(n, dtype=torch.float64) * self.factor
