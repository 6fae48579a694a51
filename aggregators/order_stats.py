"""CPU kernels for the coordinate-wise rules: median, trimmed mean, mean around the median.

One pass over the stack in column blocks; per block, while it is in cache:

1. copy it transposed into a reused ``(w, n)`` buffer, so each coordinate's n values are
   contiguous, and sort the rows in place (numpy's x86-simd-sort on contiguous rows: measured
   faster than ``np.partition``, which falls back to a scalar introselect for two kth values, and
   than any torch sort or selection on CPU; see docs/benchmarks.md);
2. check the sorted extremes for NaN/Inf (NaN sorts last), which validates every value for free;
3. write the block's output values (float64 sums of the kept sorted values);
4. compare the block with the per-coordinate thresholds, for the per-row scores and ``selected``.

Blocks are split over worker threads (:mod:`aggregators.blocks`); every output value depends on
its own column only, so the output does not depend on the block size or the thread count (the
float64 distance sums of the median's scores only in their rounding).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Tuple

import numpy as np

from aggregators.blocks import run_ranges, split_range, worker_count

#: Scratch bytes per value of a block: the transposed copy (<= 8), float64 kept values or
#: differences (8) and a few byte masks / counters.
_BYTES_PER_VALUE = 20

#: Per-row counts are summed in uint8 counters; flush them before they can overflow (at most two
#: increments per block).
_FLUSH_EVERY = 127

#: A worker's per-block step ``visit(block, ordered, start, stop)`` and its ``result()``.
Worker = Tuple[Callable[[np.ndarray, np.ndarray, int, int], None], Callable[[], object]]


def _sorted_pass(x: np.ndarray, rows: Optional[np.ndarray], max_chunk_bytes: int, make_worker: Callable[[int, int], Worker]) -> Optional[list]:
    """Run ``make_worker``'s steps on every sorted column block of ``x[rows]``; None on NaN/Inf.

    ``make_worker(m, width)`` is called once per thread (so scratch buffers are per thread) and
    returns the step and the result function; the results come back in column order.
    """
    n, d = x.shape
    m = n if rows is None else rows.shape[0]
    workers = worker_count(m * d, d)
    width = max(1, (max_chunk_bytes // workers) // (m * _BYTES_PER_VALUE))
    failed = threading.Event()

    def work(lo: int, hi: int) -> Optional[object]:
        visit, result = make_worker(m, width)
        scratch = np.empty((width, m), dtype=x.dtype)
        for start in range(lo, hi, width):
            if failed.is_set():
                return None
            stop = min(hi, start + width)
            block = x[:, start:stop] if rows is None else x[rows, start:stop]
            ordered = scratch[: stop - start]
            np.copyto(ordered, block.T)
            ordered.sort(axis=1)
            # NaN sorts after +Inf, so the first and last columns see every non-finite value.
            if not (np.isfinite(ordered[:, 0].min()) and np.isfinite(ordered[:, -1].max())):
                failed.set()
                return None
            visit(block, ordered, start, stop)
        return result()

    parts = run_ranges(work, split_range(d, workers))
    return None if any(part is None for part in parts) else parts


class _Outside:
    """Per-row counts of coordinates outside ``[low, high]`` (uint8 counters, flushed)."""

    def __init__(self, m: int, width: int, dtype: np.dtype) -> None:
        self.low, self.high = np.empty(width, dtype=dtype), np.empty(width, dtype=dtype)
        self.below, self.above = np.empty((m, width), dtype=bool), np.empty((m, width), dtype=bool)
        self.tally = np.zeros((m, width), dtype=np.uint8)
        self.counts = np.zeros(m, dtype=np.int64)
        self.steps = 0

    def add(self, block: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
        w = block.shape[1]
        np.copyto(self.low[:w], low)  # contiguous thresholds: the comparisons vectorise
        np.copyto(self.high[:w], high)
        np.less(block, self.low[:w], out=self.below[:, :w])
        np.greater(block, self.high[:w], out=self.above[:, :w])
        counter = self.tally[:, :w]
        counter += self.below[:, :w].view(np.uint8)
        counter += self.above[:, :w].view(np.uint8)
        self.steps += 1
        if self.steps == _FLUSH_EVERY:
            self.flush()

    def flush(self) -> np.ndarray:
        self.counts += self.tally.sum(axis=1, dtype=np.int64)
        self.tally[:] = 0
        self.steps = 0
        return self.counts


def _sum_into(values: np.ndarray, wide: Optional[np.ndarray], ones: np.ndarray) -> np.ndarray:
    """Row sums of ``values`` (w, k) accumulated in float64 (via ``wide`` for float32 values)."""
    if wide is not None:
        np.copyto(wide[: values.shape[0]], values)
        values = wide[: values.shape[0]]
    return values @ ones


def trimmed_mean(x: np.ndarray, f: int, vector: np.ndarray, max_chunk_bytes: int) -> Optional[np.ndarray]:
    """Coordinate-wise trimmed mean of ``x`` (n, d) into ``vector`` (d,); per-row trimmed counts.

    Returns
    -------
    ndarray or None
        ``(n,)`` int64: coordinates where the row was strictly below the (f+1)-th smallest or
        above the (f+1)-th largest value (ties count as kept). None if ``x`` holds NaN or Inf
        (``vector`` is then partly written).
    """
    n = x.shape[0]
    keep = n - 2 * f

    def make_worker(m: int, width: int) -> Worker:
        wide = np.empty((width, keep)) if x.dtype != np.float64 else None
        ones = np.ones(keep)
        outside = _Outside(m, width, x.dtype)

        def visit(block: np.ndarray, ordered: np.ndarray, start: int, stop: int) -> None:
            # Sum only the kept values (never total minus extremes: an attacker's 1e30 would
            # swallow the honest values in the subtraction).
            vector[start:stop] = _sum_into(ordered[:, f : n - f], wide, ones) / keep
            if f > 0:
                outside.add(block, ordered[:, f], ordered[:, n - f - 1])

        return visit, outside.flush

    parts = _sorted_pass(x, None, max_chunk_bytes, make_worker)
    return None if parts is None else np.sum(parts, axis=0)


def median(x: np.ndarray, vector: np.ndarray, max_chunk_bytes: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Coordinate-wise median of ``x`` (n, d) into ``vector`` (d,) (mean of the two middle values,
    in float64, for even n).

    Returns
    -------
    tuple of ndarray, or None
        ``selected``: (n,) bool, rows equal to a middle value in at least one coordinate;
        ``sq_distances``: (n,) float64 squared distances from each row to ``vector`` (as stored,
        differences in float64). None if ``x`` holds NaN or Inf.
    """
    n = x.shape[0]
    lower_at, upper_at = (n - 1) // 2, n // 2

    def make_worker(m: int, width: int) -> Worker:
        middle = np.empty(width)
        value = np.empty(width, dtype=x.dtype)
        equal = np.empty((m, width), dtype=bool)
        hits = np.zeros((m, width), dtype=bool)
        diff = np.empty((m, width))
        sq = np.zeros(m)

        def visit(block: np.ndarray, ordered: np.ndarray, start: int, stop: int) -> None:
            w = stop - start
            lower, upper = ordered[:, lower_at], ordered[:, upper_at]
            if lower_at == upper_at:
                vector[start:stop] = upper
            else:
                # Average in float64 so two huge float32 values cannot overflow.
                np.add(lower, upper, out=middle[:w], dtype=np.float64)
                vector[start:stop] = middle[:w] / 2
            for middle_value in (lower, upper) if lower_at != upper_at else (upper,):
                np.copyto(value[:w], middle_value)  # contiguous: the comparison vectorises
                np.equal(block, value[:w], out=equal[:, :w])
                np.logical_or(hits[:, :w], equal[:, :w], out=hits[:, :w])
            # Distances to the output as stored (float32 for a float32 stack), in float64:
            # cast, then subtract in place (measured faster than a mixed-dtype subtract).
            np.copyto(middle[:w], vector[start:stop])
            np.copyto(diff[:, :w], block)
            diff[:, :w] -= middle[:w]
            sq[:] += np.einsum("ij,ij->i", diff[:, :w], diff[:, :w])

        return visit, lambda: (hits.any(axis=1), sq)

    parts = _sorted_pass(x, None, max_chunk_bytes, make_worker)
    if parts is None:
        return None
    selected = np.logical_or.reduce([part[0] for part in parts])
    sq_distances = parts[0][1]
    for part in parts[1:]:
        sq_distances = sq_distances + part[1]
    return selected, sq_distances


def mean_around_median(
    x: np.ndarray, rows: Optional[np.ndarray], keep: int, vector: np.ndarray, max_chunk_bytes: int
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Per coordinate of ``x[rows]``, the float64 mean of the ``keep`` values closest to the median.

    The ``keep`` values closest to the median are a contiguous window of the sorted values: every
    value strictly nearer than the ``keep``-th smallest distance (the reach), then values at
    exactly the reach, those below the median first (so the choice depends on the values only,
    not on row order; the same rule as :func:`aggregators.coordinatewise.closest_window_start`).

    Returns
    -------
    tuple of ndarray, or None
        ``excluded``: (m,) int64 coordinates where the row fell outside the kept window (ties
        with the window's ends count as kept); ``selected``: (m,) bool, kept in at least one
        coordinate. None if the rows hold NaN or Inf.
    """
    m = x.shape[0] if rows is None else rows.shape[0]
    starts = m - keep + 1
    lower_at, upper_at = (m - 1) // 2, m // 2

    def make_worker(m: int, width: int) -> Worker:
        wide = np.empty((width, keep)) if x.dtype != np.float64 else None
        ones = np.ones(keep)
        centre = np.empty((width, 1))
        reach = np.empty((width, starts))
        spread = np.empty((width, starts))
        offsets = np.arange(keep)[None, :]
        outside = _Outside(m, width, x.dtype)

        def visit(block: np.ndarray, ordered: np.ndarray, start: int, stop: int) -> None:
            w = stop - start
            med = centre[:w]
            # float64 median (mean of the two middle values for even m).
            np.add(ordered[:, lower_at : lower_at + 1], ordered[:, upper_at : upper_at + 1], out=med, dtype=np.float64)
            med /= 2
            # How far each candidate window reaches from the median: max(med - low, high - med).
            np.subtract(med, ordered[:, :starts], out=reach[:w])
            np.subtract(ordered[:, keep - 1 : keep - 1 + starts], med, out=spread[:w])
            np.maximum(reach[:w], spread[:w], out=reach[:w])
            first = reach[:w].argmin(axis=1)  # first minimum: the lowest start on ties
            # Of the minimal-reach windows, the lowest one that keeps every value strictly nearer
            # than the reach: it ends no lower than the last such value, which sits at
            # keep - 1 + (number of window ends that are <= median or nearer than the reach) - 1.
            nearest = reach[np.arange(w), first][:, None]
            ends_in = np.count_nonzero((spread[:w] < nearest) | (spread[:w] <= 0), axis=1)
            window_start = np.maximum(first, ends_in - 1)
            window = np.take_along_axis(ordered, window_start[:, None] + offsets, axis=1)
            vector[start:stop] = _sum_into(window, wide, ones) / keep
            outside.add(block, window[:, 0], window[:, -1])

        return visit, outside.flush

    parts = _sorted_pass(x, rows, max_chunk_bytes, make_worker)
    if parts is None:
        return None
    excluded = np.sum(parts, axis=0)
    return excluded, excluded < x.shape[1]
