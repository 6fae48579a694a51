"""Distance-based selection rules: ``krum``, ``multi-krum``, ``bulyan``.

All three rank rows by the Krum score (Blanchard et al. 2017): the sum of squared distances from a
row to its ``n - f - 2`` nearest other rows. Distances come from
:func:`aggregators.geometry.pairwise_sq_distances` (float64, centred, cancellation-checked), so a
tight honest cluster far from the origin is ranked correctly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from aggregators import order_stats_triton
from aggregators.base import (
    AggregationResult,
    check_max_chunk_bytes,
    chunk_budget,
    check_num_byzantine,
    impossible,
    raise_non_finite,
    validate_updates,
    validate_weights,
)
from aggregators.coordinatewise import mean_around_median
from aggregators.geometry import pairwise_sq_distances, weighted_mean_rows
from aggregators.registry import register


def krum_scores(sq_dist: Tensor, num_neighbours: int) -> Tensor:
    """Sum of each row's ``num_neighbours`` smallest squared distances to the other rows.

    Parameters
    ----------
    sq_dist : Tensor
        ``(n, n)`` float64 squared distances.
    num_neighbours : int
        Neighbours counted, ``0 <= num_neighbours <= n - 1``.
    """
    n = sq_dist.shape[0]
    if num_neighbours <= 0:
        return torch.zeros(n, dtype=torch.float64, device=sq_dist.device)
    others = sq_dist.clone()
    others.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    return torch.topk(others, num_neighbours, dim=1, largest=False).values.sum(dim=1)


def rank_by_krum(scores: Tensor, sq_dist: Tensor, num_neighbours: int) -> Tensor:
    """Row indices from best (lowest Krum score) to worst, exact ties broken without looking at
    row order.

    Exact ties are common, not pathological: with one neighbour (Krum at f=0, n=3; Bulyan's last
    iterations) two mutual nearest neighbours have the same score, and symmetric configurations
    tie too. Breaking them by row index would make the output depend on the clients' order.
    Ties go to the smaller score with one more neighbour (the more central row), then to the
    smaller sum of distances to all rows; only rows equal in all three (e.g. duplicates) fall
    back to index order.

    Parameters
    ----------
    scores : Tensor
        ``(n,)`` Krum scores computed with ``num_neighbours`` neighbours.
    sq_dist : Tensor
        ``(n, n)`` squared distances the scores came from.
    num_neighbours : int
        Neighbours counted in ``scores``.
    """
    n = sq_dist.shape[0]
    wider = krum_scores(sq_dist, min(n - 1, num_neighbours + 1))
    order = torch.argsort(sq_dist.sum(dim=1), stable=True)
    order = order[torch.argsort(wider[order], stable=True)]
    return order[torch.argsort(scores[order], stable=True)]


def validated_distances(rule: str, updates: Tensor, max_chunk_bytes: int) -> Tensor:
    """Pairwise squared distances, with the NaN/Inf check riding on them.

    Any NaN or Inf in a row makes some of its distances non-finite, so the stack is scanned (and
    the error raised, naming the rows) only then, sparing a pass over the stack on valid input.
    """
    validate_updates(rule, updates, check_finite=False)
    sq_dist = pairwise_sq_distances(updates, max_chunk_bytes)
    if not bool(torch.isfinite(sq_dist).all()):
        validate_updates(rule, updates)  # raises unless the values merely overflow float64
    return sq_dist


def _check_krum(rule: str, n: int, f: int) -> None:
    if n <= 2 * f + 2:
        raise impossible(rule, n, f, "n > 2f + 2")


@register("krum")
class Krum:
    """Krum (Blanchard et al., NeurIPS 2017): return the single row with the lowest Krum score.

    Requires n > 2f + 2 (checked at call time). Ignores ``weights``.

    Scores: the Krum score (sum of squared distances to the n - f - 2 nearest other rows).
    ``selected``: only the chosen row (exact score ties are broken by geometry, not row order:
    see :func:`rank_by_krum`).

    Parameters
    ----------
    num_byzantine : int
        f.
    max_chunk_bytes : int or None
        Bound on float64 temporaries when computing distances. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = False

    def __init__(self, num_byzantine: int = 0, max_chunk_bytes: Optional[int] = None) -> None:
        self.num_byzantine = check_num_byzantine("krum", num_byzantine)
        self.max_chunk_bytes = check_max_chunk_bytes("krum", max_chunk_bytes)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("krum", updates, check_finite=False)
        n, _ = updates.shape
        f = self.num_byzantine
        _check_krum("krum", n, f)
        sq_dist = validated_distances("krum", updates, budget)
        scores = krum_scores(sq_dist, n - f - 2)
        best = int(rank_by_krum(scores, sq_dist, n - f - 2)[0])
        selected = torch.zeros(n, dtype=torch.bool, device=updates.device)
        selected[best] = True
        return AggregationResult(updates[best].clone(), scores, selected)

    def sensitivity(self, clip_norm: float, n: int) -> float:
        """L2 sensitivity ``2C``.

        Proof: the output is one of the input rows, each of norm <= C, before and after replacing
        a row; two vectors in the C-ball differ by at most 2C. No smaller bound holds in general:
        one replaced row can change which row wins.
        """
        return 2.0 * float(clip_norm)


@register("multi-krum")
class MultiKrum:
    """Multi-Krum (El Mhamdi et al. 2018): average the m rows with the lowest Krum scores.

    Requires n > 2f + 2 and 1 <= m <= n (checked at call time). Uses ``weights`` for the average
    of the selected rows when given (as Flower does with example counts).

    Scores: the Krum score. ``selected``: the m averaged rows.

    Parameters
    ----------
    num_byzantine : int
        f.
    num_selected : int, optional
        m; default n - f.
    max_chunk_bytes : int or None
        Bound on float64 temporaries. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = True

    def __init__(
        self,
        num_byzantine: int = 0,
        num_selected: Optional[int] = None,
        max_chunk_bytes: Optional[int] = None,
    ) -> None:
        self.num_byzantine = check_num_byzantine("multi-krum", num_byzantine)
        if num_selected is not None and (int(num_selected) != num_selected or num_selected < 1):
            raise ValueError(f"multi-krum: num_selected must be a positive integer, got {num_selected!r}")
        self.num_selected = None if num_selected is None else int(num_selected)
        self.max_chunk_bytes = check_max_chunk_bytes("multi-krum", max_chunk_bytes)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("multi-krum", updates, check_finite=False)
        w = validate_weights("multi-krum", weights, updates)
        n, d = updates.shape
        f = self.num_byzantine
        _check_krum("multi-krum", n, f)
        m = n - f if self.num_selected is None else self.num_selected
        if m > n:
            raise ValueError(f"multi-krum: num_selected={m} exceeds n={n} (f={f})")
        sq_dist = validated_distances("multi-krum", updates, budget)
        scores = krum_scores(sq_dist, n - f - 2)
        chosen = rank_by_krum(scores, sq_dist, n - f - 2)[:m]
        selected = torch.zeros(n, dtype=torch.bool, device=updates.device)
        selected[chosen] = True
        coeffs = selected.to(torch.float64) if w is None else w * selected
        if float(coeffs.sum()) <= 0.0:  # every selected row has weight zero: fall back to uniform
            coeffs = selected.to(torch.float64)
        vector = torch.empty(d, dtype=updates.dtype, device=updates.device)
        weighted_mean_rows(updates, coeffs / coeffs.sum(), vector, budget)
        return AggregationResult(vector, scores, selected)

    def sensitivity(self, clip_norm: float, n: int) -> float:
        """L2 sensitivity ``2C``.

        Proof: the output is a convex combination of input rows, so it lies in the C-ball before
        and after the replacement, and two points of the C-ball are at most 2C apart. The
        ``2C/m`` of a fixed-set mean does not apply: one replaced row can change the whole
        selected set.
        """
        return 2.0 * float(clip_norm)


@register("bulyan")
class Bulyan:
    """Bulyan (El Mhamdi et al., ICML 2018).

    1. Selection: theta = n - 2f rows by iterated Krum -- repeatedly take the row with the lowest
       Krum score among the rows not yet taken (scores recomputed on the remaining set, with
       ``max(1, r - f - 2)`` neighbours for r remaining rows).
    2. Aggregation: per coordinate, the mean of the beta = theta - 2f selected values closest to
       the selected values' median.

    Requires n >= 4f + 3 (checked at call time). Ignores ``weights``.

    Scores: fraction of the row's coordinates that did not enter the average (1 for rows not
    selected in step 1). ``selected``: rows that entered the average in at least one coordinate.

    Parameters
    ----------
    num_byzantine : int
        f.
    max_chunk_bytes : int or None
        Bound on temporaries. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = False

    def __init__(self, num_byzantine: int = 0, max_chunk_bytes: Optional[int] = None) -> None:
        self.num_byzantine = check_num_byzantine("bulyan", num_byzantine)
        self.max_chunk_bytes = check_max_chunk_bytes("bulyan", max_chunk_bytes)

    @order_stats_triton.falls_back_to_sorting
    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("bulyan", updates, check_finite=False)
        n, d = updates.shape
        f = self.num_byzantine
        if n < 4 * f + 3:
            raise impossible("bulyan", n, f, "n >= 4f + 3")
        theta, beta = n - 2 * f, n - 4 * f
        sq_dist = validated_distances("bulyan", updates, budget)
        remaining = list(range(n))
        chosen: list[int] = []
        for _ in range(theta):  # a loop over rows, not coordinates
            sub = sq_dist[remaining][:, remaining]
            neighbours = max(1, len(remaining) - f - 2)
            scores = krum_scores(sub, neighbours)
            chosen.append(remaining.pop(int(rank_by_krum(scores, sub, neighbours)[0])))
        index = torch.tensor(chosen, device=updates.device)
        found = mean_around_median(updates, index, beta, budget)
        if found is None:  # cannot happen: the distances above were finite
            raise_non_finite("bulyan", updates)
        vector, excluded, kept = found
        fraction = torch.ones(n, dtype=torch.float64, device=updates.device)
        fraction[index] = excluded / d
        selected = torch.zeros(n, dtype=torch.bool, device=updates.device)
        selected[index] = kept
        return AggregationResult(vector, fraction, selected)
