"""Mean and coordinate-wise rules: ``mean``, ``median``, ``trimmed-mean``, ``meamed``.

Three kernels, one result:

- CPU (float32/64): :mod:`aggregators.order_stats`, numpy's SIMD sort on column blocks of at most
  ``max_chunk_bytes`` of temporaries (measured fastest there);
- CUDA (float32/64, up to :data:`aggregators.order_stats_triton.MAX_ROWS` rows, Triton installed):
  :mod:`aggregators.order_stats_triton`, selection in registers, one read of the stack; its
  temporaries are a few values per program and row, so it needs no column chunks;
- anything else: ``torch.sort`` along the n axis on chunks of columns
  (:func:`aggregators.geometry.sorted_coordinates`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from aggregators.base import (
    AggregationResult,
    check_max_chunk_bytes,
    chunk_budget,
    check_num_byzantine,
    column_chunks,
    impossible,
    raise_non_finite,
    validate_updates,
    validate_weights,
)
from aggregators import order_stats, order_stats_triton
from aggregators.blocks import as_numpy, uses_numpy
from aggregators.geometry import sorted_coordinates, sq_distances_to, weighted_mean_rows
from aggregators.registry import register


def _selects_on_gpu(updates: Tensor, rows: int) -> bool:
    """Whether ``updates`` takes the Triton selection kernels (see the module docstring)."""
    return not uses_numpy(updates) and order_stats_triton.supports(updates, rows)


#: Temporaries per element in a coordinate-wise chunk: the sorted copy (<= 8 bytes), float64
#: window/median arithmetic (~16 bytes) and a few boolean masks.
_COORDINATE_BYTES_PER_VALUE = 32


def _median_of_sorted(ordered: Tensor) -> Tensor:
    """Float64 median of each row of a ``(w, n)`` row-wise ascending tensor (mean of the two
    middle values when n is even, as ``numpy.median``)."""
    n = ordered.shape[1]
    upper = ordered[:, n // 2].to(torch.float64)
    if n % 2 == 1:
        return upper
    # Average in float64 so two huge float32 values cannot overflow.
    return (ordered[:, n // 2 - 1].to(torch.float64) + upper) / 2


def closest_window_start(ordered: Tensor, keep: int) -> Tensor:
    """Start index of the ``keep`` consecutive sorted values closest to each coordinate's median.

    The ``keep`` values closest to the median are always a contiguous window of the sorted
    values, and the windows whose farthest value is nearest to the median (the reach) are the
    candidates. Of those, the lowest one that keeps every value strictly nearer than the reach
    wins: ties at exactly the reach are taken below the median first, so the choice depends on the
    values only, not on row order (for 0, 0, 1.5, 1.8, 3 and keep 3: 0, 1.5, 1.8, never 0, 0, 1.5,
    which would drop 1.8 for a farther 0).

    Parameters
    ----------
    ordered : Tensor
        ``(w, n)``, each row sorted ascending.
    keep : int
        Window length, ``1 <= keep <= n``.

    Returns
    -------
    Tensor
        ``(w,)`` int64 start indices in ``[0, n - keep]``.
    """
    n = ordered.shape[1]
    starts = n - keep + 1
    median = _median_of_sorted(ordered)[:, None]
    lows = ordered[:, :starts].to(torch.float64)
    highs = ordered[:, keep - 1 : keep - 1 + starts].to(torch.float64)
    spread = highs - median
    reach = torch.maximum(median - lows, spread)
    first = reach.argmin(dim=1)
    nearest = reach.gather(1, first[:, None])
    # The last value strictly nearer than the reach ends a window: the window ends that are at or
    # below the median or nearer than the reach, counted, place it.
    ends_in = ((spread < nearest) | (spread <= 0)).sum(dim=1)
    return torch.maximum(first, ends_in - 1)


@register("mean")
class Mean:
    """(Weighted) arithmetic mean: FedAvg's rule, not robust to a single Byzantine row.

    Uses ``weights`` (normalised to sum to one). Accumulates in float64.

    Scores: Euclidean distance of each row to the output. ``selected``: rows with positive weight.

    Parameters
    ----------
    max_chunk_bytes : int or None
        Bound on float64 temporaries per column chunk. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = True
    #: ``scores`` are each row's Euclidean distance to ``vector`` as returned (float64
    #: differences): a server may use them as that distance instead of measuring it again.
    scores_are_distances = True

    def __init__(self, max_chunk_bytes: Optional[int] = None) -> None:
        self.max_chunk_bytes = check_max_chunk_bytes("mean", max_chunk_bytes)

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        # The NaN/Inf check rides on the distances to the output (a NaN/Inf anywhere in a row makes
        # its distance non-finite), sparing a pass over the stack on valid input.
        validate_updates("mean", updates, check_finite=False)
        w = validate_weights("mean", weights, updates)
        n, d = updates.shape
        coeffs = torch.full((n,), 1.0 / n, dtype=torch.float64, device=updates.device) if w is None else w / w.sum()
        vector = torch.empty(d, dtype=updates.dtype, device=updates.device)
        weighted_mean_rows(updates, coeffs, vector, budget)
        sq_distances = sq_distances_to(updates, vector, budget)
        if not bool(torch.isfinite(sq_distances).all()):
            validate_updates("mean", updates)  # raises unless the values merely overflow float64
        scores = sq_distances.sqrt()
        return AggregationResult(vector, scores, coeffs > 0)

    def sensitivity(self, clip_norm: float, n: int) -> float:
        """L2 sensitivity ``2C/n`` of the unweighted mean (call without ``weights``).

        Proof: replacing row i by i' changes the mean by ``(x_i' - x_i)/n`` and
        ``||x_i' - x_i|| <= ||x_i'|| + ||x_i|| <= 2C``. With weights the bound is
        ``2C max_i w_i / sum_i w_i`` instead, so a DP server must not pass weights.
        """
        return 2.0 * float(clip_norm) / int(n)


@register("median")
class Median:
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values for even n.

    Ignores ``weights``. Tolerates any f < n/2 (no parameter needed).

    Scores: Euclidean distance of each row to the output. ``selected``: rows that supply a middle
    value (the median, or one of the two averaged middle values) in at least one coordinate.

    Parameters
    ----------
    max_chunk_bytes : int or None
        Bound on the sorted copy and temporaries per column chunk. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = False
    #: ``scores`` are each row's Euclidean distance to ``vector`` (see :class:`Mean`).
    scores_are_distances = True

    def __init__(self, max_chunk_bytes: Optional[int] = None) -> None:
        self.max_chunk_bytes = check_max_chunk_bytes("median", max_chunk_bytes)

    @order_stats_triton.falls_back_to_sorting
    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        # The numpy and Triton kernels see every value, so they check for NaN/Inf on the way.
        validate_updates("median", updates, check_finite=False)
        n, d = updates.shape
        if uses_numpy(updates):
            vector = torch.empty(d, dtype=updates.dtype)
            found = order_stats.median(as_numpy(updates), as_numpy(vector), budget)
            if found is None:
                raise_non_finite("median", updates)
            selected, sq_distances = found
            return AggregationResult(vector, torch.from_numpy(sq_distances).sqrt(), torch.from_numpy(selected))
        if _selects_on_gpu(updates, n):
            vector = torch.empty(d, dtype=updates.dtype, device=updates.device)
            found = order_stats_triton.kept_mean(updates, (n - 1) // 2, n // 2, vector, with_sq_distances=True)
            if found is None:
                raise_non_finite("median", updates)
            outside, sq_distances = found
            # Outside both middle values in every coordinate: supplied no middle value.
            return AggregationResult(vector, sq_distances.sqrt(), outside < d)
        validate_updates("median", updates)
        vector = torch.empty(d, dtype=updates.dtype, device=updates.device)
        selected = torch.zeros(n, dtype=torch.bool, device=updates.device)
        for cols in column_chunks(n, d, _COORDINATE_BYTES_PER_VALUE, budget):
            block = updates[:, cols]
            ordered = sorted_coordinates(block).to(updates.device)
            vector[cols] = _median_of_sorted(ordered).to(updates.dtype)
            lower, upper = ordered[:, (n - 1) // 2], ordered[:, n // 2]
            selected |= ((block == lower) | (block == upper)).any(dim=1)
        scores = sq_distances_to(updates, vector, budget).sqrt()
        return AggregationResult(vector, scores, selected)

    def sensitivity(self, clip_norm: float, n: int) -> float:
        """L2 sensitivity ``2C``.

        Proof: replacing one value of a column by another moves every order statistic of that
        column by at most the change of that value (order statistics are 1-Lipschitz in the
        sup norm), so the median of coordinate j moves by at most ``|x_ij' - x_ij|`` (also for the
        average of two order statistics). Summing squares over j: ``||delta|| <= ||x_i' - x_i||
        <= 2C``. (The coordinate-wise median can leave the C-ball, so the bound is not via the
        convex hull.)
        """
        return 2.0 * float(clip_norm)


@register("trimmed-mean")
class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the f largest and f smallest values of
    every coordinate, average the remaining n - 2f.

    Requires n > 2f (checked at call time). Ignores ``weights``.

    Scores: fraction of the row's coordinates that were trimmed (strictly below the (f+1)-th
    smallest or above the (f+1)-th largest value; tied values count as kept). Honest rows score
    about 2f/n, a row that is extreme everywhere scores 1. ``selected``: rows kept in at least one
    coordinate.

    Parameters
    ----------
    num_byzantine : int
        f, values trimmed per side.
    max_chunk_bytes : int or None
        Bound on the sorted copy and temporaries per column chunk. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = False

    def __init__(self, num_byzantine: int = 0, max_chunk_bytes: Optional[int] = None) -> None:
        self.num_byzantine = check_num_byzantine("trimmed-mean", num_byzantine)
        self.max_chunk_bytes = check_max_chunk_bytes("trimmed-mean", max_chunk_bytes)

    @order_stats_triton.falls_back_to_sorting
    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("trimmed-mean", updates, check_finite=False)
        n, d = updates.shape
        numpy_kernel, gpu_kernel = uses_numpy(updates), _selects_on_gpu(updates, n)
        if not (numpy_kernel or gpu_kernel):
            validate_updates("trimmed-mean", updates)  # the others see every value and check
        f = self.num_byzantine
        if n <= 2 * f:
            raise impossible("trimmed-mean", n, f, "n > 2f")
        if gpu_kernel:
            vector = torch.empty(d, dtype=updates.dtype, device=updates.device)
            found = order_stats_triton.kept_mean(updates, f, n - f - 1, vector, with_sq_distances=False)
            if found is None:
                raise_non_finite("trimmed-mean", updates)
            counts = found[0]
            return AggregationResult(vector, counts.to(torch.float64) / d, counts < d)
        if numpy_kernel:
            vector = torch.empty(d, dtype=updates.dtype)
            counts = order_stats.trimmed_mean(as_numpy(updates), f, as_numpy(vector), budget)
            if counts is None:
                raise_non_finite("trimmed-mean", updates)
            counts = torch.from_numpy(counts)
            return AggregationResult(vector, counts.to(torch.float64) / d, counts < d)
        vector = torch.empty(d, dtype=updates.dtype, device=updates.device)
        trimmed = torch.zeros(n, dtype=torch.float64, device=updates.device)
        selected = torch.zeros(n, dtype=torch.bool, device=updates.device)
        for cols in column_chunks(n, d, _COORDINATE_BYTES_PER_VALUE, budget):
            block = updates[:, cols]
            ordered = sorted_coordinates(block).to(updates.device)
            kept = ordered[:, f : n - f]
            # Sum only the kept values (never total minus extremes: an attacker's 1e30 would
            # swallow the honest values in the subtraction).
            vector[cols] = (kept.to(torch.float64).sum(dim=1) / (n - 2 * f)).to(updates.dtype)
            outside = (block < ordered[:, f]) | (block > ordered[:, n - f - 1])
            count = outside.sum(dim=1)
            trimmed += count
            selected |= count < block.shape[1]  # kept in at least one coordinate of the chunk
        return AggregationResult(vector, trimmed / d, selected)

    def sensitivity(self, clip_norm: float, n: int) -> float:
        """L2 sensitivity ``2C / (n - 2f)``.

        Proof: fix a coordinate and replace one value x by x' > x (the other case is symmetric).
        Every order statistic is non-decreasing in each input, so each sorted value moves up by a
        non-negative amount, and together they move by exactly ``x' - x`` (the total sum changes
        by that). Hence any sum of order statistics -- in particular the n - 2f kept ones -- moves
        by at most ``|x' - x|``, and the trimmed mean of that coordinate by at most
        ``|x' - x| / (n - 2f)``. Over all coordinates: ``||delta|| <= ||x_i' - x_i|| / (n - 2f)
        <= 2C / (n - 2f)``.
        """
        n = int(n)
        if n <= 2 * self.num_byzantine:
            raise impossible("trimmed-mean", n, self.num_byzantine, "n > 2f")
        return 2.0 * float(clip_norm) / (n - 2 * self.num_byzantine)


@register("meamed")
class MeaMed:
    """Mean around the median (Xie et al. 2018, "Generalized Byzantine-tolerant SGD"): for every
    coordinate, the mean of the n - f values closest to that coordinate's median.

    Requires n > 2f (checked at call time). Ignores ``weights``.

    Scores: fraction of the row's coordinates in which its value was not among the n - f kept.
    ``selected``: rows kept in at least one coordinate.

    Parameters
    ----------
    num_byzantine : int
        f; each coordinate keeps n - f values.
    max_chunk_bytes : int or None
        Bound on temporaries per column chunk. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = False

    def __init__(self, num_byzantine: int = 0, max_chunk_bytes: Optional[int] = None) -> None:
        self.num_byzantine = check_num_byzantine("meamed", num_byzantine)
        self.max_chunk_bytes = check_max_chunk_bytes("meamed", max_chunk_bytes)

    @order_stats_triton.falls_back_to_sorting
    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("meamed", updates, check_finite=False)
        if not (uses_numpy(updates) or _selects_on_gpu(updates, updates.shape[0])):
            validate_updates("meamed", updates)  # the others see every value and check
        n, d = updates.shape
        f = self.num_byzantine
        if n <= 2 * f:
            raise impossible("meamed", n, f, "n > 2f")
        found = mean_around_median(updates, None, n - f, budget)
        if found is None:
            raise_non_finite("meamed", updates)
        vector, excluded, selected = found
        return AggregationResult(vector, excluded / d, selected)


def mean_around_median(
    updates: Tensor, rows: Optional[Tensor], keep: int, max_chunk_bytes: int
) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """Per coordinate of ``updates[rows]`` (all rows when None), average the ``keep`` values
    closest to the median.

    The rows are gathered block by block, so a subset costs no copy of the stack. On CPU
    (float32/64) this runs :func:`aggregators.order_stats.mean_around_median` and on CUDA
    :func:`aggregators.order_stats_triton.closest_mean`, which return None when they meet NaN or
    Inf (the sorting fallback does not check: validate first).

    Returns
    -------
    vector : Tensor
        ``(d,)`` in the input dtype.
    excluded : Tensor
        ``(n,)`` float64 count of coordinates where the row fell outside the kept window.
    selected : Tensor
        ``(n,)`` bool, kept in at least one coordinate.
    """
    d = updates.shape[1]
    n = updates.shape[0] if rows is None else int(rows.numel())
    vector = torch.empty(d, dtype=updates.dtype, device=updates.device)
    if uses_numpy(updates):
        index = None if rows is None else as_numpy(rows)
        found = order_stats.mean_around_median(as_numpy(updates), index, keep, as_numpy(vector), max_chunk_bytes)
        if found is None:
            return None
        excluded, selected = found
        return vector, torch.from_numpy(excluded).to(torch.float64), torch.from_numpy(selected)
    if _selects_on_gpu(updates, n):
        counts = order_stats_triton.closest_mean(updates, rows, keep, vector)
        if counts is None:
            return None
        return vector, counts.to(torch.float64), counts < d
    excluded = torch.zeros(n, dtype=torch.float64, device=updates.device)
    selected = torch.zeros(n, dtype=torch.bool, device=updates.device)
    offsets = torch.arange(keep, device=updates.device)[None, :]
    for cols in column_chunks(n, d, _COORDINATE_BYTES_PER_VALUE + 8 * 2, max_chunk_bytes):
        block = updates[:, cols] if rows is None else updates[:, cols].index_select(0, rows)
        ordered = sorted_coordinates(block).to(updates.device)
        start = closest_window_start(ordered, keep)
        window = torch.gather(ordered, 1, start[:, None] + offsets)
        vector[cols] = (window.to(torch.float64).sum(dim=1) / keep).to(updates.dtype)
        outside = (block < window[:, 0]) | (block > window[:, -1])
        count = outside.sum(dim=1)
        excluded += count
        selected |= count < block.shape[1]  # kept in at least one coordinate of the chunk
    return vector, excluded, selected
