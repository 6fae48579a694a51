"""Exact distance, norm and sorting kernels shared by the rules.

Why not ``torch.cdist`` or ``|x|^2 + |y|^2 - 2 x.y`` on the raw rows: model updates are often
large vectors that differ by little (rows ~1, differences ~1e-3), and the expansion then cancels
catastrophically in float32 -- Flower's Krum picks the wrong client on exactly such input.

Pairwise distances (:func:`pairwise_sq_distances`) come from float64 Gram matrices of *centred*
rows, with every pair's rounding error bounded:

1. A sample of columns picks a central row (smallest median distance to the others).
2. One pass over the stack: rows minus that row, in float64, one symmetric product (syrk) per
   tile of ``GRAM_TILE`` columns. A pair is kept when the worst-case float64 error of its
   expansion, ``2 (d + 4) u (|c_i|^2 + |c_j|^2)``, is below ``RELATIVE_TOLERANCE`` of its distance.
3. Pairs that fail (rows close to each other but far from the centre: colluding attackers, a
   second cluster) are redone on their own cluster, centred on its central row; what still fails
   goes to the exact fallback (column-mean centring, then differences summed directly).

Why float64 products and not float32 ones with float64 tile sums: a float32 sum over a tile of K
columns rounds with an error that grows like ``sqrt(K) u32`` times the partial sums; a stack with
a few large coordinates (two client groups that differ in 40 columns) gave relative errors of
1.1e-5 at K=4096, and no bound certifies 1e-5 at any practical K. float64 products cost ~1.8x.

On CPU the products are numpy/OpenBLAS calls in worker threads (:mod:`aggregators.blocks`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from aggregators.base import DEFAULT_MAX_CHUNK_BYTES, column_chunks
from aggregators.blocks import as_numpy, run_ranges, split_range, uses_numpy, worker_count

#: Most columns per symmetric product (fewer when ``max_chunk_bytes`` asks): measured as fast as
#: 2048-4096 for the product and faster for the float64 cast (larger, fewer numpy calls).
GRAM_TILE: int = 8192

#: A pair from the checked Gram is kept when its worst-case error is below this fraction of its
#: squared distance (so its relative error is below 1e-5).
RELATIVE_TOLERANCE: float = 2.0**-17

#: The column sample that picks the central rows: ``_SKETCH_RUNS`` runs of ``_SKETCH_RUN`` columns
#: spread over the stack. Stacks no wider than the sample take the exact fallback directly.
_SKETCH_RUNS, _SKETCH_RUN = 16, 128
SKETCH_COLUMNS: int = _SKETCH_RUNS * _SKETCH_RUN

#: Centrings (all rows, then the clusters whose pairs failed) before the exact fallback.
_CENTRED_LEVELS = 2

#: Row-tile width of the row-wise kernels (distances to a point, norms, dots).
_ROW_TILE_COLUMNS = 1 << 15

# ---------------------------------------------------------------------------------------------
# Centred Gram matrices


Group = tuple[Optional[Tensor], Optional[Tensor]]


def _centred_grams(updates: Tensor, groups: list[Group], max_chunk_bytes: int) -> list[Tensor]:
    """float64 Gram matrices of ``updates[rows] - centre`` for several groups, in one pass.

    Parameters
    ----------
    updates : Tensor
        ``(n, d)`` stack.
    groups : list of (rows, centre)
        ``rows``: row indices (int64, on ``updates.device``) or None for all rows. ``centre``:
        ``(d,)`` vector subtracted from those rows (differences taken in float64), or None for
        their column mean (computed per block).
    max_chunk_bytes : int
        Bound on the scratch memory of all worker threads together.

    Returns
    -------
    list of Tensor
        One symmetric ``(m, m)`` float64 matrix per group.
    """
    n, d = updates.shape
    sizes = [n if rows is None else int(rows.numel()) for rows, _ in groups]
    if uses_numpy(updates):
        x = as_numpy(updates)
        plans = [
            (None if rows is None else as_numpy(rows), None if centre is None else as_numpy(centre.to(device="cpu", dtype=torch.float64)))
            for rows, centre in groups
        ]
        workers = worker_count(sum(sizes) * d, -(-d // GRAM_TILE))
        # Per value: the float64 tile and, for a row subset, the gathered copy.
        width = max(1, min(GRAM_TILE, (max_chunk_bytes // workers) // (max(sizes) * 12)))

        def work(lo: int, hi: int) -> list[np.ndarray]:
            grams = [np.zeros((m, m)) for m in sizes]  # overflow gives Inf/NaN: the caller checks
            tile = np.empty((max(sizes), width))
            for start in range(lo, hi, width):
                stop = min(hi, start + width)
                for (index, point), gram in zip(plans, grams):
                    block = tile[: gram.shape[0], : stop - start]
                    # Fancy indexing, not np.take(out=...): measured 7x faster for a few rows.
                    np.copyto(block, x[:, start:stop] if index is None else x[index, start:stop])
                    # Cast, then subtract in place: measured faster than a mixed-dtype subtract.
                    block -= block.mean(axis=0) if point is None else point[start:stop]
                    gram += block @ block.T  # numpy calls syrk for a product with its own transpose
            return grams

        parts = run_ranges(work, split_range(d, workers, GRAM_TILE))
        totals = parts[0]
        for part in parts[1:]:
            for total, gram in zip(totals, part):
                total += gram
        grams = [torch.from_numpy(total).to(updates.device) for total in totals]
    else:
        grams = [torch.zeros((m, m), dtype=torch.float64, device=updates.device) for m in sizes]
        for cols in column_chunks(max(sizes), d, 16, max_chunk_bytes):
            for (rows, centre), gram in zip(groups, grams):
                block = updates[:, cols] if rows is None else updates[:, cols].index_select(0, rows)
                block = block.to(torch.float64)
                if centre is None:
                    block = block - block.mean(dim=0, keepdim=True)
                else:
                    block = block - centre[cols].to(device=updates.device, dtype=torch.float64)
                gram.addmm_(block, block.T)
    return [(gram + gram.T) / 2 for gram in grams]


def _distances_from_gram(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances from a Gram matrix, and ``scale``: the two centred squared norms summed."""
    sq = gram.diagonal()
    scale = sq[:, None] + sq[None, :]
    dist = (scale - 2 * gram).clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return dist, scale


# ---------------------------------------------------------------------------------------------
# Exact fallback


def _exact_pairwise(updates: Tensor, rows: Optional[Tensor], max_chunk_bytes: int) -> Tensor:
    """float64-exact squared distances between ``updates[rows]`` (all rows when None).

    Pass 1 uses the float64 Gram matrix of the column-centred rows (translation does not change
    distances and removes the common offset that causes cancellation). If a far outlier drags the
    mean so that many pairs still fail the error bound (:func:`_trusted_pairs`), pass 2 centres on
    the row closest to the others instead. Pairs that still fail are recomputed as
    ``sum((x_i - x_j)^2)`` in float64, which is exact up to float64 rounding of the sum because the
    difference of two float32 values is exact in float64.
    """
    n, d = updates.shape
    index = torch.arange(n, device=updates.device) if rows is None else rows
    m = int(index.numel())
    dist, scale = _distances_from_gram(_centred_grams(updates, [(rows, None)], max_chunk_bytes)[0])
    upper = torch.ones((m, m), dtype=torch.bool, device=updates.device).triu_(diagonal=1)
    nobody = torch.zeros(m, dtype=torch.bool, device=updates.device)
    cancelled = upper & ~_trusted_pairs(dist, scale, d, nobody)
    if int(cancelled.sum()) > m:
        # A robust centre: the row with the smallest median distance to the others.
        centre_row = int(index[int(dist.median(dim=1).values.argmin())])
        dist, scale = _distances_from_gram(_centred_grams(updates, [(rows, updates[centre_row])], max_chunk_bytes)[0])
        cancelled = upper & ~_trusted_pairs(dist, scale, d, nobody)
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
# Checked path


def _sketch_columns(d: int, device: torch.device) -> Tensor:
    """Column indices of the sample that picks central rows (runs spread evenly over ``d``)."""
    run = min(_SKETCH_RUN, d)
    starts = torch.linspace(0, d - run, _SKETCH_RUNS, dtype=torch.float64).round().to(torch.int64)
    return torch.unique(starts[:, None] + torch.arange(run)[None, :]).to(device)


def _medoid(sq_dist: Tensor) -> int:
    """Index of the row with the smallest median squared distance to the rows."""
    return int(sq_dist.median(dim=1).values.argmin())


def _trusted_pairs(dist: Tensor, scale: Tensor, d: int, equal: Tensor) -> Tensor:
    """Pairs whose Gram distance is provably within ``RELATIVE_TOLERANCE`` (relative) of exact.

    Each Gram entry sums d float64 products in some order: error <= gamma sum_k |c_ik c_jk| with
    gamma = (d + 4) u (the 4 covers the centring and product roundings), and by Cauchy-Schwarz the
    distance ``|c_i|^2 + |c_j|^2 - 2 c_i.c_j`` is off by at most ``2 gamma scale`` (scale: the two
    squared norms). An absolute floor covers products below float64's normal range. ``equal``
    marks rows verified equal to the centre: two of them are exactly 0 apart (a zero norm alone
    proves nothing once squares underflow).
    """
    unit = float(torch.finfo(torch.float64).eps) / 2
    error = 2.01 * (d + 4) * unit * scale + 4.0 * d * float(torch.finfo(torch.float64).tiny)
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


def _predicted_clusters(sketch: Tensor, centre: int, d: int) -> list[Tensor]:
    """Clusters whose pairs the sample predicts to fail the check when centred on ``centre``.

    On the sample, a row's centred squared norm is its squared distance to the centre, so the
    check's ratio (scale-free) can be evaluated before the pass over the stack.
    """
    to_centre = sketch[centre]
    scale = to_centre[:, None] + to_centre[None, :]
    failing = ~_trusted_pairs(sketch, scale, d, torch.zeros_like(to_centre, dtype=torch.bool))
    failing.fill_diagonal_(False)
    return _components(failing)


def _checked_pairwise(updates: Tensor, max_chunk_bytes: int) -> Tensor:
    """Squared distances from row-centred float64 Gram matrices, every pair's error bounded.

    Each level is one pass over the stack computing several Gram matrices: level 0 all rows
    centred on the central row plus the clusters the sample predicts to fail (each centred on its
    own central row); level 1 the clusters of pairs still open; then the exact fallback.
    """
    n, d = updates.shape
    device = updates.device
    sketch = _exact_pairwise(updates.index_select(1, _sketch_columns(d, device)), None, max_chunk_bytes)
    dist = torch.zeros((n, n), dtype=torch.float64, device=device)
    final = torch.eye(n, dtype=torch.bool, device=device)
    everyone = torch.arange(n, device=device)
    centre = _medoid(sketch)
    level_groups = [everyone] + [everyone[c] for c in _predicted_clusters(sketch, centre, d)]
    for level in range(_CENTRED_LEVELS + 1):
        if not level_groups:
            break
        if level == _CENTRED_LEVELS:
            for rows in level_groups:
                grid = (rows[:, None], rows[None, :])
                dist[grid] = torch.where(final[grid], dist[grid], _exact_pairwise(updates, rows, max_chunk_bytes))
                final[grid] = True
            break
        centres = [int(rows[_medoid(sketch[rows[:, None], rows[None, :]])]) for rows in level_groups]
        if level == 0:
            centres[0] = centre
        grams = _centred_grams(
            updates, [(None if rows.numel() == n else rows, updates[c]) for rows, c in zip(level_groups, centres)], max_chunk_bytes
        )
        if not all(bool(torch.isfinite(gram).all()) for gram in grams):
            # NaN/Inf in the input (or float64 overflow): the exact path says which distances.
            return _exact_pairwise(updates, None, max_chunk_bytes)
        for rows, c, gram in zip(level_groups, centres, grams):
            grid = (rows[:, None], rows[None, :])
            sub_dist, scale = _distances_from_gram(gram)
            trusted = _trusted_pairs(sub_dist, scale, d, _equal_to_centre(updates, rows, c, gram))
            dist[grid] = torch.where(final[grid] | ~trusted, dist[grid], sub_dist)
            final[grid] |= trusted
        level_groups = [everyone[c] for c in _components(~final)]
    return dist


def pairwise_sq_distances(updates: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Squared Euclidean distances between all rows, relative error below 1e-5 for every pair.

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
    Stacks wider than ``SKETCH_COLUMNS`` take the checked path (module notes): one float64 pass
    over the stack for most inputs, a partial second one for each cluster far from the centre.
    The rest, and the pairs the check rejects twice, take the exact fallback. Non-finite input
    gives non-finite distances (callers validate).
    """
    if updates.shape[1] > SKETCH_COLUMNS and updates.shape[0] > 2:
        return _checked_pairwise(updates, max_chunk_bytes)
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
                # Cast, then subtract in place: measured 25% faster than a mixed-dtype subtract.
                np.copyto(tile, x[r0:r1, c0:c1])
                if mode == "distance":
                    tile -= point[c0:c1]
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


def mix_rows_into(updates: Tensor, mixing: Tensor, out: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Write ``mixing @ updates`` into ``out``, accumulated in float64 per column block.

    Parameters
    ----------
    updates : Tensor
        ``(n, d)`` stack.
    mixing : Tensor
        ``(m, n)`` coefficients (used in float64).
    out : Tensor
        ``(m, d)`` buffer on ``updates.device``; filled (rounded to its dtype) and returned.
    """
    m, n = mixing.shape
    d = updates.shape[1]
    mixing = mixing.to(device=updates.device, dtype=torch.float64)
    if not (uses_numpy(updates) and out.device.type == "cpu"):
        for cols in column_chunks(max(m, n), d, 16, max_chunk_bytes):
            out[:, cols] = (mixing @ updates[:, cols].to(torch.float64)).to(out.dtype)
        return out
    x, coefficients, target = as_numpy(updates), as_numpy(mixing), as_numpy(out)
    workers = worker_count(max(m, n) * d, -(-d // GRAM_TILE))
    width = max(1, min(d, (max_chunk_bytes // workers) // (8 * (n + m))))

    def work(lo: int, hi: int) -> None:
        wide = np.empty((n, width))
        for start in range(lo, hi, width):
            stop = min(hi, start + width)
            block = wide[:, : stop - start]
            np.copyto(block, x[:, start:stop])
            target[:, start:stop] = coefficients @ block

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
    if uses_numpy(block):
        # .copy() always allocates (np.ascontiguousarray would return a view of an already
        # contiguous (1, n) transpose, and the in-place sort would then reorder the caller's data).
        rows = block.detach().numpy().T.copy(order="C")
        rows.sort(axis=1)
        return torch.from_numpy(rows)
    return torch.sort(block.T.contiguous(), dim=1).values
