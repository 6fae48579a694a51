"""CPU kernels for the coordinate-wise median and trimmed mean (numpy, float32/float64).

One pass over the stack in column blocks; per block, while it is in cache:

1. copy it transposed into a reused ``(w, n)`` buffer, so each coordinate's n values are
   contiguous, and sort the rows in place (numpy's x86-simd-sort on contiguous rows: measured
   faster than ``np.partition``, which falls back to a scalar introselect for two kth values, and
   than any torch sort or selection on CPU; see docs/benchmarks.md);
2. check the sorted extremes for NaN/Inf (NaN sorts last), which validates every value for free;
3. write the block's output values (float64 sums of the kept sorted values);
4. compare the block with the per-coordinate thresholds to count, per row, the trimmed
   coordinates (trimmed mean) or find the rows supplying a middle value and accumulate the
   float64 squared distance to the output (median).

Blocks are split over worker threads (:mod:`aggregators.blocks`); every value a kernel writes
depends on its own column only, so the output does not depend on the block size or the thread
count (the float64 distance sums only in their rounding).
"""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from aggregators.blocks import run_ranges, split_range, worker_count

#: Scratch bytes per value of a block: the transposed copy (<= 8), float64 kept values or
#: differences (8) and a few byte masks / counters.
_BYTES_PER_VALUE = 20

#: Per-row trimmed counts are summed in uint8 counters; flush them before they can overflow
#: (two increments per block).
_FLUSH_EVERY = 127


def _block_width(n: int, workers: int, max_chunk_bytes: int) -> int:
    return max(1, (max_chunk_bytes // workers) // (n * _BYTES_PER_VALUE))


def _sort_block(source: np.ndarray, rows: np.ndarray) -> bool:
    """Copy ``source`` (n, w) transposed into ``rows`` (w, n), sort each row; False on NaN/Inf."""
    np.copyto(rows, source.T)
    rows.sort(axis=1)
    # NaN sorts after +Inf, so the first and last columns see every non-finite value.
    return bool(np.isfinite(rows[:, 0].min()) and np.isfinite(rows[:, -1].max()))


def trimmed_mean(x: np.ndarray, f: int, vector: np.ndarray, max_chunk_bytes: int) -> Optional[np.ndarray]:
    """Coordinate-wise trimmed mean of ``x`` (n, d) into ``vector`` (d,); per-row trimmed counts.

    Returns
    -------
    ndarray or None
        ``(n,)`` int64: coordinates where the row was strictly below the (f+1)-th smallest or
        above the (f+1)-th largest value (ties count as kept). None if ``x`` holds NaN or Inf
        (``vector`` is then partly written).
    """
    n, d = x.shape
    keep = n - 2 * f
    workers = worker_count(n * d, d)
    width = _block_width(n, workers, max_chunk_bytes)
    failed = threading.Event()

    def work(lo: int, hi: int) -> Optional[np.ndarray]:
        rows = np.empty((width, n), dtype=x.dtype)
        wide = np.empty((width, keep)) if x.dtype != np.float64 else None
        ones = np.ones(keep)
        low, high = np.empty(width, dtype=x.dtype), np.empty(width, dtype=x.dtype)
        below, above = np.empty((n, width), dtype=bool), np.empty((n, width), dtype=bool)
        tally = np.zeros((n, width), dtype=np.uint8)
        counts = np.zeros(n, dtype=np.int64)
        steps = 0
        for start in range(lo, hi, width):
            if failed.is_set():
                return None
            stop = min(hi, start + width)
            w = stop - start
            block = x[:, start:stop]
            ordered = rows[:w]
            if not _sort_block(block, ordered):
                failed.set()
                return None
            kept = ordered[:, f : n - f]
            if wide is not None:
                np.copyto(wide[:w], kept)  # float64, so the sum below accumulates in float64
                kept = wide[:w]
            # Sum only the kept values (never total minus extremes: an attacker's 1e30 would
            # swallow the honest values in the subtraction).
            vector[start:stop] = (kept @ ones) / keep
            if f == 0:
                continue
            np.copyto(low[:w], ordered[:, f])
            np.copyto(high[:w], ordered[:, n - f - 1])
            np.less(block, low[:w], out=below[:, :w])
            np.greater(block, high[:w], out=above[:, :w])
            counter = tally[:, :w]
            counter += below[:, :w].view(np.uint8)
            counter += above[:, :w].view(np.uint8)
            steps += 1
            if steps == _FLUSH_EVERY:
                counts += tally.sum(axis=1, dtype=np.int64)
                tally[:] = 0
                steps = 0
        return counts + tally.sum(axis=1, dtype=np.int64)

    parts = run_ranges(work, split_range(d, workers))
    if any(part is None for part in parts):
        return None
    return np.sum(parts, axis=0)


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
    n, d = x.shape
    workers = worker_count(n * d, d)
    width = _block_width(n, workers, max_chunk_bytes)
    lower_at, upper_at = (n - 1) // 2, n // 2
    failed = threading.Event()

    def work(lo: int, hi: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        rows = np.empty((width, n), dtype=x.dtype)
        lower, upper = np.empty(width, dtype=x.dtype), np.empty(width, dtype=x.dtype)
        middle = np.empty(width)
        equal = np.empty((n, width), dtype=bool)
        hits = np.zeros((n, width), dtype=bool)
        diff = np.empty((n, width))
        sq = np.zeros(n)
        for start in range(lo, hi, width):
            if failed.is_set():
                return None
            stop = min(hi, start + width)
            w = stop - start
            block = x[:, start:stop]
            ordered = rows[:w]
            if not _sort_block(block, ordered):
                failed.set()
                return None
            np.copyto(lower[:w], ordered[:, lower_at])
            np.copyto(upper[:w], ordered[:, upper_at])
            if lower_at == upper_at:
                vector[start:stop] = upper[:w]
            else:
                # Average in float64 so two huge float32 values cannot overflow.
                np.add(lower[:w], upper[:w], out=middle[:w], dtype=np.float64)
                vector[start:stop] = middle[:w] / 2
            for value in (lower, upper) if lower_at != upper_at else (upper,):
                np.equal(block, value[:w], out=equal[:, :w])
                np.logical_or(hits[:, :w], equal[:, :w], out=hits[:, :w])
            # Distances to the output as stored (float32 for a float32 stack), in float64.
            np.copyto(middle[:w], vector[start:stop])
            np.subtract(block, middle[:w], out=diff[:, :w])
            sq += np.einsum("ij,ij->i", diff[:, :w], diff[:, :w])
        return hits.any(axis=1), sq

    parts = run_ranges(work, split_range(d, workers))
    if any(part is None for part in parts):
        return None
    selected = np.logical_or.reduce([part[0] for part in parts])
    sq_distances = parts[0][1]
    for part in parts[1:]:
        sq_distances = sq_distances + part[1]
    return selected, sq_distances
