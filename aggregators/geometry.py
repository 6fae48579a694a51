"""Exact distance, norm and sorting kernels shared by the rules.

Why not ``torch.cdist`` or ``|x|^2 + |y|^2 - 2 x.y`` on the raw rows: model updates are often
large vectors that differ by little (rows ~1, differences ~1e-3), and the expansion then cancels
catastrophically in float32 -- Flower's Krum picks the wrong client on exactly such input.

Pairwise distances (:func:`pairwise_sq_distances`) come from Gram matrices of *centred* rows, with
every pair's rounding error bounded and checked:

- float32 stacks with at least ``FAST_GRAM_MIN_COLUMNS`` columns: rows minus a central row, one
  float32 matrix product per tile of ``GRAM_TILE`` columns, tiles summed in float64. A pair is kept
  when its estimated error (``ROUNDING_FACTOR`` float32 roundings of the two centred squared
  norms) is below ``RELATIVE_TOLERANCE`` of its distance; the pairs that fail (rows that are close
  to each other but far from the centre, e.g. colluding attackers) are redone on their own cluster
  centred there, and what still fails goes to the float64 path.
- the float64 path: float64 column blocks centred on the column mean (or a robust row), pairs
  that still cancel recomputed from their differences (exact up to float64 rounding).

On CPU the products are numpy/OpenBLAS calls in worker threads (:mod:`aggregators.blocks`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from aggregators.base import DEFAULT_MAX_CHUNK_BYTES, column_chunks
from aggregators.blocks import as_numpy, run_ranges, split_range, uses_numpy, worker_count

#: float64 path: a pair whose squared distance is below this fraction of the two centred squared
#: norms lost more than ~4 of float64's ~16 digits to cancellation: it is recomputed from the
#: difference itself.
_CANCELLATION_RATIO: float = 1e-4

#: Columns per float32 product. The float32 sum over a tile is what rounds; measured worst error
#: of the summed Gram at 4096 columns: 0.8 float32 roundings of the squared norms (1.2 at 16384,
#: up to 6 at 65536), on random, near-identical and attacked stacks.
GRAM_TILE: int = 4096

#: Assumed float32 roundings of the centred squared norms in a pair's Gram error (~10x the
#: measured worst case above).
ROUNDING_FACTOR: float = 8.0

#: A float32-Gram pair is kept when its error estimate is below this fraction of its squared
#: distance (so its relative error stays below ~1e-5).
RELATIVE_TOLERANCE: float = 2.0**-17

#: Narrower stacks take the float64 path, which is as cheap there (below ~1 ms at n=50).
FAST_GRAM_MIN_COLUMNS: int = 2 * GRAM_TILE

#: float32 levels (all rows, then the clusters whose pairs failed) before the float64 path.
_FLOAT32_LEVELS = 2

#: The column sample that picks the central row: ``_SKETCH_RUNS`` runs of ``_SKETCH_RUN`` columns
#: spread over the stack.
_SKETCH_RUNS, _SKETCH_RUN = 16, 128

#: Row-tile width of the row-wise kernels (distances to a point, norms, dots).
_ROW_TILE_COLUMNS = 1 << 15

_NUMPY_SORTABLE = {torch.float32, torch.float64}


# ---------------------------------------------------------------------------------------------
# Centred Gram matrices


def _gram_tile_width(rows: int, bytes_per_value: int, budget: int) -> int:
    return max(1, min(GRAM_TILE, budget // max(1, rows * bytes_per_value)))


def _centred_gram(
    updates: Tensor,
    rows: Optional[Tensor],
    centre: Optional[Tensor],
    dtype: torch.dtype,
    max_chunk_bytes: int,
) -> Tensor:
    """Gram matrix, summed in float64, of ``updates[rows] - centre`` computed in ``dtype``.

    Parameters
    ----------
    updates : Tensor
        ``(n, d)`` stack.
    rows : Tensor or None
        Row indices (int64, on ``updates.device``); None for all rows.
    centre : Tensor or None
        ``(d,)`` vector subtracted from every row; None for the column mean of the chosen rows
        (computed per block in ``dtype``, which must then be float64).
    dtype : torch.dtype
        Precision of the centred values and of the products within a tile (float32 or float64).
    max_chunk_bytes : int
        Bound on the scratch memory of all worker threads together.
    """
    n, d = updates.shape
    m = n if rows is None else int(rows.numel())
    itemsize = torch.empty((), dtype=dtype).element_size()
    if uses_numpy(updates):
        x = as_numpy(updates)
        index = None if rows is None else as_numpy(rows)
        point = None if centre is None else as_numpy(centre.to(device="cpu", dtype=dtype))
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        workers = worker_count(m * d, -(-d // GRAM_TILE))
        width = _gram_tile_width(m, itemsize * 2, max_chunk_bytes // workers)

        def work(lo: int, hi: int) -> np.ndarray:
            gram = np.zeros((m, m))  # float32 overflow gives Inf/NaN here: the caller checks
            tile = np.empty((m, width), dtype=np_dtype)
            for start in range(lo, hi, width):
                stop = min(hi, start + width)
                block = tile[:, : stop - start]
                # Fancy indexing, not np.take(out=...): measured 7x faster for a few rows.
                source = x[:, start:stop] if index is None else x[index, start:stop]
                if point is None:
                    np.copyto(block, source)
                    block -= block.mean(axis=0)
                else:
                    np.subtract(source, point[start:stop], out=block)
                gram += block @ block.T  # numpy calls syrk for a product with its own transpose
            return gram

        parts = run_ranges(work, split_range(d, workers, GRAM_TILE))
        total = parts[0]
        for part in parts[1:]:
            total += part
        gram = torch.from_numpy(total).to(updates.device)
    else:
        gram = torch.zeros((m, m), dtype=torch.float64, device=updates.device)
        for cols in column_chunks(m, d, itemsize * 2, max_chunk_bytes):
            block = updates[:, cols] if rows is None else updates[:, cols].index_select(0, rows)
            block = block.to(dtype)
            if centre is None:
                block = block - block.mean(dim=0, keepdim=True)
            else:
                block = block - centre[cols].to(device=updates.device, dtype=dtype)
            gram += (block @ block.T).to(torch.float64)
    return (gram + gram.T) / 2


def _distances_from_gram(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances from a Gram matrix, and ``scale``: the two centred squared norms summed."""
    sq = gram.diagonal()
    scale = sq[:, None] + sq[None, :]
    dist = (scale - 2 * gram).clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return dist, scale


# ---------------------------------------------------------------------------------------------
# float64 path


def _exact_pairwise(updates: Tensor, rows: Optional[Tensor], max_chunk_bytes: int) -> Tensor:
    """float64-exact squared distances between ``updates[rows]`` (all rows when None).

    Pass 1 uses the float64 Gram matrix of the column-centred rows (translation does not change
    distances and removes the common offset that causes cancellation). If a far outlier drags the
    mean so that many pairs still cancel, pass 2 centres on the row closest to the others
    instead. Pairs that still cancel are recomputed as ``sum((x_i - x_j)^2)`` in float64, which is
    exact up to float64 rounding of the sum because the difference of two float32 values is exact
    in float64.
    """
    n, d = updates.shape
    index = torch.arange(n, device=updates.device) if rows is None else rows
    m = int(index.numel())
    dist, scale = _distances_from_gram(_centred_gram(updates, rows, None, torch.float64, max_chunk_bytes))
    upper = torch.ones((m, m), dtype=torch.bool, device=updates.device).triu_(diagonal=1)
    cancelled = upper & (dist <= _CANCELLATION_RATIO * scale) & (scale > 0)
    if int(cancelled.sum()) > m:
        # A robust centre: the row with the smallest median distance to the others.
        centre_row = int(index[int(dist.median(dim=1).values.argmin())])
        dist, scale = _distances_from_gram(_centred_gram(updates, rows, updates[centre_row], torch.float64, max_chunk_bytes))
        cancelled = upper & (dist <= _CANCELLATION_RATIO * scale) & (scale > 0)
    for i in torch.nonzero(cancelled.any(dim=1)).flatten().tolist():
        others = index[torch.nonzero(cancelled[i]).flatten()]
        exact = torch.zeros(others.numel(), dtype=torch.float64, device=updates.device)
        row = int(index[i])
        for cols in column_chunks(others.numel(), d, 16, max_chunk_bytes):
            diff = updates[others, cols].to(torch.float64) - updates[row, cols].to(torch.float64)
            exact += diff.square().sum(dim=1)
        dist[i, cancelled[i]] = exact
    upper_dist = torch.triu(dist, diagonal=1)
    return upper_dist + upper_dist.T


# ---------------------------------------------------------------------------------------------
# float32 path


def _float32_gram_is_exact_enough(updates: Tensor) -> bool:
    """Whether float32 products are true float32 here (no TF32/bfloat16 shortcuts) and worth it."""
    if updates.dtype != torch.float32 or updates.shape[1] < FAST_GRAM_MIN_COLUMNS or updates.shape[0] < 2:
        return False
    if updates.device.type == "cpu":
        return True  # numpy/OpenBLAS: plain float32 (torch's matmul precision setting does not apply)
    if updates.device.type == "cuda":
        return torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
    return False


def _sketch_columns(d: int, device: torch.device) -> Tensor:
    """Column indices of the sample that picks central rows (runs spread evenly over ``d``)."""
    run = min(_SKETCH_RUN, d)
    starts = torch.linspace(0, d - run, _SKETCH_RUNS, dtype=torch.float64).round().to(torch.int64)
    return torch.unique(starts[:, None] + torch.arange(run)[None, :]).to(device)


def _medoid(sq_dist: Tensor) -> int:
    """Index of the row with the smallest median squared distance to the rows."""
    return int(sq_dist.median(dim=1).values.argmin())


def _trusted_pairs(dist: Tensor, scale: Tensor, d: int, equal: Tensor) -> Tensor:
    """Pairs whose float32-Gram distance is within ``RELATIVE_TOLERANCE`` (relative) of exact.

    The error estimate is ``ROUNDING_FACTOR`` float32 roundings of the two centred squared norms,
    plus an absolute floor for products below float32's normal range (4 x tiny per column).
    ``equal`` marks rows verified equal to the centre row: two of them are exactly 0 apart (a zero
    centred norm alone proves nothing: squares of values below ~1e-19 underflow to 0).
    """
    unit = float(torch.finfo(torch.float32).eps) / 2
    floor = 4.0 * d * float(torch.finfo(torch.float32).tiny)
    error = ROUNDING_FACTOR * unit * scale + floor
    return (error <= RELATIVE_TOLERANCE * dist) | (equal[:, None] & equal[None, :])


def _equal_to_centre(updates: Tensor, rows: Tensor, centre_row: int, gram: Tensor) -> Tensor:
    """Which of ``rows`` equal the centre row exactly (checked only where the centred norm is 0)."""
    equal = torch.zeros(rows.numel(), dtype=torch.bool, device=updates.device)
    centre = updates[centre_row]
    for i in torch.nonzero(gram.diagonal() == 0).flatten().tolist():
        row = int(rows[i])
        equal[i] = row == centre_row or torch.equal(updates[row], centre)
    return equal


def _components(pending: Tensor) -> list[Tensor]:
    """Connected components (index tensors, >= 2 members) of a symmetric boolean adjacency."""
    m = pending.shape[0]
    unseen = pending.any(dim=1)
    components = []
    while bool(unseen.any()):
        members = torch.zeros(m, dtype=torch.bool, device=pending.device)
        members[int(torch.nonzero(unseen)[0])] = True
        while True:
            grown = members | pending[members].any(dim=0)
            if bool((grown == members).all()):
                break
            members = grown
        unseen &= ~members
        components.append(torch.nonzero(members).flatten())
    return components


def _float32_pairwise(updates: Tensor, max_chunk_bytes: int) -> Tensor:
    """Squared distances from float32 Gram matrices, every pair checked (see the module notes)."""
    n, d = updates.shape
    device = updates.device
    sketch = _exact_pairwise(updates.index_select(1, _sketch_columns(d, device)), None, max_chunk_bytes)
    dist = torch.zeros((n, n), dtype=torch.float64, device=device)
    final = torch.eye(n, dtype=torch.bool, device=device)
    todo = [(torch.arange(n, device=device), 0)]
    while todo:
        rows, level = todo.pop()
        grid = (rows[:, None], rows[None, :])
        if level >= _FLOAT32_LEVELS:
            exact = _exact_pairwise(updates, rows, max_chunk_bytes)
            dist[grid] = torch.where(final[grid], dist[grid], exact)
            final[grid] = True
            continue
        centre_row = int(rows[_medoid(sketch[grid])])
        gram = _centred_gram(updates, None if level == 0 else rows, updates[centre_row], torch.float32, max_chunk_bytes)
        if not bool(torch.isfinite(gram).all()):
            # float32 overflow (values beyond ~1e19) or NaN/Inf in the input: float64 throughout.
            return _exact_pairwise(updates, None, max_chunk_bytes)
        sub_dist, scale = _distances_from_gram(gram)
        trusted = _trusted_pairs(sub_dist, scale, d, _equal_to_centre(updates, rows, centre_row, gram))
        dist[grid] = torch.where(final[grid] | ~trusted, dist[grid], sub_dist)
        final[grid] |= trusted
        for component in _components(~final[grid]):
            todo.append((rows[component], level + 1))
    return dist


def pairwise_sq_distances(updates: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Squared Euclidean distances between all rows, relative error below ~1e-5 for every pair.

    Parameters
    ----------
    updates : Tensor
        ``(n, d)`` floating stack on any device.
    max_chunk_bytes : int
        Bound on the temporaries (all worker threads together).

    Returns
    -------
    Tensor
        ``(n, n)`` float64, symmetric, zero diagonal, on ``updates.device``.

    Notes
    -----
    float32 stacks of at least ``FAST_GRAM_MIN_COLUMNS`` columns use float32 products with a
    per-pair error check (module notes); the rest, and the pairs that fail the check, are exact up
    to float64 rounding. Non-finite input gives non-finite distances (callers validate).
    """
    if _float32_gram_is_exact_enough(updates):
        return _float32_pairwise(updates, max_chunk_bytes)
    return _exact_pairwise(updates, None, max_chunk_bytes)


# ---------------------------------------------------------------------------------------------
# Row-wise kernels: distances to a point, norms, dot products


def _row_reduce(updates: Tensor, vector: Optional[Tensor], mode: str, max_chunk_bytes: int) -> Tensor:
    """Per-row float64 reductions over row tiles (contiguous for a row-major stack).

    ``mode``: "distance" (``sum((x - vector)^2)``, differences in float64), "norm"
    (``sum(x^2)``) or "dot" (``x . vector``).
    """
    n, d = updates.shape
    out = torch.zeros(n, dtype=torch.float64, device=updates.device)
    if not uses_numpy(updates):
        point = None if vector is None else vector.to(device=updates.device, dtype=torch.float64)
        for cols in column_chunks(n, d, 16, max_chunk_bytes):
            block = updates[:, cols].to(torch.float64)
            if mode == "distance":
                out += (block - point[cols]).square().sum(dim=1)
            elif mode == "norm":
                out += block.square().sum(dim=1)
            else:
                out += block @ point[cols]
        return out
    x = as_numpy(updates)
    point = None if vector is None else as_numpy(vector.detach().to(device="cpu", dtype=torch.float64))
    result = as_numpy(out)
    workers = worker_count(n * d, n)
    width = min(d, _ROW_TILE_COLUMNS)
    tile_rows = max(1, min(n, (max_chunk_bytes // workers) // (8 * width)))
    width = min(width, max(1, (max_chunk_bytes // workers) // (8 * tile_rows)))

    def work(lo: int, hi: int) -> None:
        scratch = np.empty((min(tile_rows, hi - lo), width))
        for r0 in range(lo, hi, tile_rows):
            r1 = min(hi, r0 + tile_rows)
            acc = np.zeros(r1 - r0)
            for c0 in range(0, d, width):
                c1 = min(d, c0 + width)
                tile = scratch[: r1 - r0, : c1 - c0]
                if mode == "distance":
                    np.subtract(x[r0:r1, c0:c1], point[c0:c1], out=tile)
                else:
                    np.copyto(tile, x[r0:r1, c0:c1])
                if mode == "dot":
                    acc += tile @ point[c0:c1]
                else:
                    acc += np.einsum("ij,ij->i", tile, tile)
            result[r0:r1] = acc

    run_ranges(work, split_range(n, workers))
    return out


def sq_distances_to(updates: Tensor, point: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Float64 squared distances from each row of ``updates`` to the vector ``point``.

    The differences are taken in float64 tile by tile (row tiles: contiguous memory), so no
    cancellation occurs.
    """
    return _row_reduce(updates, point, "distance", max_chunk_bytes)


def sq_norms(updates: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Float64 squared L2 norms of the rows, accumulated in float64 tiles.

    float32 ``torch.linalg.vector_norm`` on CPU is off by ~4e-4 (relative) at d=1e7.
    """
    return _row_reduce(updates, None, "norm", max_chunk_bytes)


def dot_with(updates: Tensor, vector: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Float64 dot products of each row with ``vector``, accumulated in float64 tiles."""
    return _row_reduce(updates, vector, "dot", max_chunk_bytes)


# ---------------------------------------------------------------------------------------------
# Weighted sums of rows and per-coordinate sorting


def weighted_mean_rows(updates: Tensor, coeffs: Tensor, out: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Write ``coeffs @ updates`` into ``out``, accumulated in float64 per column block.

    Parameters
    ----------
    updates : Tensor
        ``(n, d)`` stack.
    coeffs : Tensor
        ``(n,)`` float64 coefficients (already normalised by the caller).
    out : Tensor
        ``(d,)`` buffer in the output dtype; filled and returned.
    """
    n, d = updates.shape
    coeffs = coeffs.to(device=updates.device, dtype=torch.float64)
    active = torch.nonzero(coeffs).flatten()
    # Rows with zero coefficient are skipped instead of multiplied by 0, so their values (however
    # large) cannot leak in through rounding.
    if not (uses_numpy(updates) and out.device.type == "cpu"):
        if active.numel() < n:
            updates, coeffs = updates[active], coeffs[active]
        for cols in column_chunks(updates.shape[0], d, 8, max_chunk_bytes):
            out[cols] = (coeffs @ updates[:, cols].to(torch.float64)).to(out.dtype)
        return out
    x = as_numpy(updates)
    index = None if active.numel() == n else as_numpy(active)
    weights = as_numpy(coeffs[active]) if index is not None else as_numpy(coeffs)
    target = as_numpy(out)
    m = weights.shape[0]
    workers = worker_count(m * d, -(-d // GRAM_TILE))
    width = max(1, min(d, (max_chunk_bytes // workers) // (12 * m)))

    def work(lo: int, hi: int) -> None:
        wide = np.empty((m, width))
        picked = np.empty((m, width), dtype=x.dtype) if index is not None else None
        for start in range(lo, hi, width):
            stop = min(hi, start + width)
            block = wide[:, : stop - start]
            if index is None:
                np.copyto(block, x[:, start:stop])
            else:
                np.take(x[:, start:stop], index, axis=0, out=picked[:, : stop - start], mode="clip")
                np.copyto(block, picked[:, : stop - start])
            target[start:stop] = block.T @ weights

    run_ranges(work, split_range(d, workers, GRAM_TILE))
    return out


def sorted_coordinates(block: Tensor) -> Tensor:
    """Sort the n values of every coordinate of an ``(n, w)`` block.

    Returns
    -------
    Tensor
        ``(w, n)`` contiguous, row j holding column j of ``block`` in ascending order (a new
        tensor: the input is never modified).

    Notes
    -----
    On CPU, float32/64 blocks are copied transposed into a new contiguous numpy array and sorted
    in place along its rows: numpy's vectorised sort (x86-simd-sort) on contiguous rows of n
    values was measured several times faster than ``torch.sort(block, dim=0)`` at n=50, d=1e6
    (docs/benchmarks.md). Sorting is exact, so results are identical. Other devices and dtypes
    use ``torch.sort``.
    """
    if block.device.type == "cpu" and block.dtype in _NUMPY_SORTABLE:
        # .copy() always allocates (np.ascontiguousarray would return a view of an already
        # contiguous (1, n) transpose, and the in-place sort would then reorder the caller's data).
        rows = block.detach().numpy().T.copy(order="C")
        rows.sort(axis=1)
        return torch.from_numpy(rows)
    return torch.sort(block.T.contiguous(), dim=1).values
