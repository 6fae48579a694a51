"""FLTrust (``fltrust``): trust scores from cosine similarity to a server-side trusted update."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from aggregators.base import (
    AggregationResult,
    check_max_chunk_bytes,
    chunk_budget,
    validate_updates,
)
from aggregators.geometry import dot_with, sq_norms, weighted_mean_rows
from aggregators.registry import register


@register("fltrust")
class FLTrust:
    """FLTrust (Cao et al., NDSS 2021).

    Trust score of row i: ``ts_i = ReLU(cos(x_i, g0))`` with ``g0`` the server's trusted update
    (computed on its root data set). Output: ``sum_i ts_i (||g0|| / ||x_i||) x_i / sum_i ts_i``,
    i.e. rows rescaled to the trusted update's norm and averaged by trust; the zero vector when no
    row has positive trust. All products and norms accumulate in float64. Ignores ``weights``.
    Takes no f.

    The server must call :meth:`set_trusted_update` before every call (``needs_trusted_update``
    is True); the trusted update is consumed by the call, so a stale one is never reused.

    Scores: ``1 - ts_i`` in [0, 1]. ``selected``: rows with positive trust.

    Parameters
    ----------
    max_chunk_bytes : int or None
        Bound on float64 temporaries. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = False
    needs_trusted_update = True

    def __init__(self, max_chunk_bytes: Optional[int] = None) -> None:
        self.max_chunk_bytes = check_max_chunk_bytes("fltrust", max_chunk_bytes)
        self.trusted_update: Optional[Tensor] = None

    def set_trusted_update(self, vector: Tensor) -> None:
        """Set this round's trusted update ``g0``, shape ``(d,)``, finite, non-zero."""
        budget = chunk_budget(self.max_chunk_bytes, vector)
        if not isinstance(vector, Tensor) or vector.dim() != 1 or not vector.is_floating_point():
            raise ValueError("fltrust: trusted update must be a 1-D floating tensor")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("fltrust: trusted update contains NaN or Inf")
        if float(sq_norms(vector[None, :], budget)[0]) == 0.0:
            raise ValueError("fltrust: trusted update has zero norm")
        self.trusted_update = vector

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("fltrust", updates)
        n, d = updates.shape
        if self.trusted_update is None:
            raise ValueError("fltrust: call set_trusted_update(vector) before aggregating")
        trusted, self.trusted_update = self.trusted_update, None
        if trusted.shape != (d,):
            raise ValueError(f"fltrust: trusted update has shape {tuple(trusted.shape)}, updates have d={d}")
        trusted_norm = float(sq_norms(trusted[None, :], budget)[0]) ** 0.5
        norms = sq_norms(updates, budget).sqrt()
        dots = dot_with(updates, trusted, budget)
        cosine = torch.where(norms > 0, dots / (norms.clamp(min=1e-300) * trusted_norm), torch.zeros_like(norms))
        trust = cosine.clamp(min=0.0, max=1.0)
        selected = trust > 0
        vector = torch.zeros(d, dtype=updates.dtype, device=updates.device)
        if bool(selected.any()):
            coeffs = trust * trusted_norm / norms.clamp(min=1e-300) / trust.sum()
            coeffs = torch.where(selected, coeffs, torch.zeros_like(coeffs))
            weighted_mean_rows(updates, coeffs, vector, budget)
        return AggregationResult(vector, 1.0 - trust, selected)
