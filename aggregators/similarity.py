"""Pairwise cosine similarities of the rows of a stack (FLAME's clustering, FoolsGold's history).

Cosine similarity needs no centring: ``cos(x, y) = x.y / (|x| |y|)`` has no cancellation between
large, nearly equal terms, so one float64 Gram matrix of the raw rows (the same threaded float64
kernel as the distances of :mod:`aggregators.geometry`, centred on the origin) is accurate to a
few float64 ulps times the square root of d.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aggregators.geometry import _centred_grams


def gram_matrix(updates: Tensor, max_chunk_bytes: int) -> Tensor:
    """``updates @ updates.T`` accumulated in float64, on ``updates.device``, exactly symmetric."""
    origin = torch.zeros(updates.shape[1], dtype=torch.float64, device=updates.device)
    return _centred_grams(updates, [(None, origin)], max_chunk_bytes)[0]


def cosine_similarities(updates: Tensor, max_chunk_bytes: int) -> tuple[Tensor, Tensor]:
    """Cosine similarity of every pair of rows, and the rows' L2 norms.

    Parameters
    ----------
    updates : Tensor
        ``(n, d)`` finite floating stack on any device.
    max_chunk_bytes : int
        Bound on the float64 temporaries of the Gram pass.

    Returns
    -------
    (Tensor, Tensor)
        ``(n, n)`` float64 similarities in [-1, 1], symmetric, ones on the diagonal; ``(n,)``
        float64 norms. Both on ``updates.device``.

    Notes
    -----
    The cosine of a zero row is undefined. Here a zero row is orthogonal to every non-zero row
    (similarity 0, as FLTrust treats it) and identical to other zero rows (similarity 1): a zero
    update carries no direction, and several zero updates are the same update. A float64 row whose
    squared norm underflows (norm below ~1e-154) counts as zero. A similarity within the float64
    rounding bound ``2 (d + 4) u`` of 1 is set to exactly 1, so that identical rows are identical
    to each other wherever they sit in the stack.
    """
    gram = gram_matrix(updates, max_chunk_bytes)
    scale = torch.ones(updates.shape[0], dtype=torch.float64, device=updates.device)
    if not bool(torch.isfinite(gram).all()):
        # Only float64 rows with norms beyond ~1e154 overflow; the cosine does not change when each
        # row is divided by its largest magnitude (values then in [-1, 1]).
        peak = updates.abs().amax(dim=1)
        scale = torch.where(peak > 0, peak, torch.ones_like(peak)).to(torch.float64)
        gram = gram_matrix(updates / scale.to(updates.dtype)[:, None], max_chunk_bytes)
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    zero = norms == 0
    cosine = gram / (norms[:, None] * norms[None, :]).clamp(min=1e-300)
    cosine = torch.where(zero[:, None] | zero[None, :], torch.zeros_like(cosine), cosine)
    both_zero = zero[:, None] & zero[None, :]
    cosine = torch.where(both_zero, torch.ones_like(cosine), cosine).clamp_(min=-1.0, max=1.0)
    # Parallel rows within rounding of each other are parallel: identical rows must get identical
    # similarities whatever their position in the stack (BLAS rounds diagonal and off-diagonal
    # entries differently, by up to the dot-product bound (d + 2) u relative to |x| |y|).
    tolerance = 2 * (updates.shape[1] + 4) * torch.finfo(torch.float64).eps
    cosine = torch.where(cosine >= 1.0 - tolerance, torch.ones_like(cosine), cosine)
    cosine.fill_diagonal_(1.0)
    return cosine, norms * scale
