"""Exact distance, norm and sorting kernels shared by the rules.

Why not ``torch.cdist`` or ``|x|^2 + |y|^2 - 2 x.y`` in the input dtype: model updates are often
large vectors that differ by little (rows ~1, differences ~1e-3), and the expansion then cancels
catastrophically in float32 -- Flower's Krum picks the wrong client on exactly such input. Here
every reduction runs in float64 over column blocks (memory stays bounded by ``max_chunk_bytes``),
on centred data, and the few pairs whose Gram expansion still cancels are recomputed directly from
their differences.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from aggregators.base import DEFAULT_MAX_CHUNK_BYTES, column_chunks

#: A pair whose squared distance is below this fraction of the two centred squared norms lost more
#: than ~4 of float64's ~16 digits to cancellation: it is recomputed from the difference itself.
_CANCELLATION_RATIO: float = 1e-4

_NUMPY_SORTABLE = {torch.float32, torch.float64}


def _centred_gram(updates: Tensor, centre: Tensor | None, max_chunk_bytes: int) -> Tensor:
    """Float64 Gram matrix of ``updates - centre`` (``centre=None``: the column mean)."""
    n, d = updates.shape
    gram = torch.zeros((n, n), dtype=torch.float64, device=updates.device)
    # Two float64 temporaries per element: the cast block and the centred block.
    for cols in column_chunks(n, d, 16, max_chunk_bytes):
        block = updates[:, cols].to(torch.float64)
        if centre is None:
            block = block - block.mean(dim=0, keepdim=True)
        else:
            block = block - centre[cols].to(torch.float64)
        gram.addmm_(block, block.T)
    return (gram + gram.T) / 2


def _distances_from_gram(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances from a Gram matrix, and the mask of upper-triangle pairs that cancelled."""
    sq = gram.diagonal()
    scale = sq[:, None] + sq[None, :]
    dist = (scale - 2 * gram).clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    n = gram.shape[0]
    upper = torch.ones((n, n), dtype=torch.bool, device=gram.device).triu_(diagonal=1)
    cancelled = upper & (dist <= _CANCELLATION_RATIO * scale) & (scale > 0)
    return dist, cancelled


def pairwise_sq_distances(updates: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Squared Euclidean distances between all rows, accurate to float64 rounding.

    Parameters
    ----------
    updates : Tensor
        ``(n, d)`` floating stack on any device.
    max_chunk_bytes : int
        Bound on the float64 temporaries per column block.

    Returns
    -------
    Tensor
        ``(n, n)`` float64, symmetric, zero diagonal, on ``updates.device``.

    Notes
    -----
    Pass 1 uses the Gram matrix of the column-centred data (translation does not change distances
    and removes the common offset that causes cancellation). If a far outlier drags the mean so
    that many pairs still cancel, pass 2 centres on the row closest to the others instead. Pairs
    that still cancel are recomputed as ``sum((x_i - x_j)^2)`` in float64, which is exact up to
    float64 rounding of the sum because the difference of two float32 values is exact in float64.
    """
    n, _ = updates.shape
    dist, cancelled = _distances_from_gram(_centred_gram(updates, None, max_chunk_bytes))
    if int(cancelled.sum()) > n:
        # A robust centre: the row with the smallest median distance to the others.
        centre_row = int(dist.median(dim=1).values.argmin())
        gram = _centred_gram(updates, updates[centre_row], max_chunk_bytes)
        dist, cancelled = _distances_from_gram(gram)
    for i in torch.nonzero(cancelled.any(dim=1)).flatten().tolist():
        others = torch.nonzero(cancelled[i]).flatten()
        exact = torch.zeros(others.numel(), dtype=torch.float64, device=updates.device)
        for cols in column_chunks(others.numel(), updates.shape[1], 16, max_chunk_bytes):
            diff = updates[others, cols].to(torch.float64) - updates[i, cols].to(torch.float64)
            exact += diff.square().sum(dim=1)
        dist[i, others] = exact
    upper = torch.triu(dist, diagonal=1)
    return upper + upper.T


def sq_distances_to(updates: Tensor, point: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Float64 squared distances from each row of ``updates`` to the vector ``point``.

    The differences are taken in float64 block by block, so no cancellation occurs.
    """
    n, d = updates.shape
    out = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for cols in column_chunks(n, d, 16, max_chunk_bytes):
        diff = updates[:, cols].to(torch.float64) - point[cols].to(device=updates.device, dtype=torch.float64)
        out += diff.square().sum(dim=1)
    return out


def sq_norms(updates: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Float64 squared L2 norms of the rows, accumulated in float64 blocks.

    float32 ``torch.linalg.vector_norm`` on CPU is off by ~4e-4 (relative) at d=1e7.
    """
    n, d = updates.shape
    out = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for cols in column_chunks(n, d, 8, max_chunk_bytes):
        out += updates[:, cols].to(torch.float64).square().sum(dim=1)
    return out


def dot_with(updates: Tensor, vector: Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Float64 dot products of each row with ``vector``, accumulated in float64 blocks."""
    n, d = updates.shape
    out = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for cols in column_chunks(n, d, 8, max_chunk_bytes):
        out += updates[:, cols].to(torch.float64) @ vector[cols].to(device=updates.device, dtype=torch.float64)
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
    if active.numel() < n:
        # Rows with zero coefficient are skipped instead of multiplied by 0, so their values
        # (however large) cannot leak in through rounding.
        updates, coeffs = updates[active], coeffs[active]
    for cols in column_chunks(updates.shape[0], d, 8, max_chunk_bytes):
        out[cols] = (coeffs @ updates[:, cols].to(torch.float64)).to(out.dtype)
    return out
