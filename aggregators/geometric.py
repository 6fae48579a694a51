"""Rules that move a centre through space: ``geometric-median`` and ``centered-clipping``.

Both keep their iterate in float64 and measure distances with float64 block accumulation
(:func:`aggregators.geometry.sq_distances_to`), one pass over the stack per iteration.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from aggregators.base import (
    AggregationResult,
    check_max_chunk_bytes,
    chunk_budget,
    validate_updates,
    validate_weights,
)
from aggregators.geometry import sq_distances_to, weighted_mean_rows
from aggregators.registry import register


def _positive(rule: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{rule}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def _positive_int(rule: str, name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{rule}: {name} must be a positive integer, got {value!r}")
    return int(value)


@register("geometric-median")
class GeometricMedian:
    """Geometric median by smoothed Weiszfeld iterations (RFA, Pillutla, Kakade & Harchaoui 2022).

    Minimises ``sum_i w_i ||v - x_i||`` starting from the weighted mean; each step is the
    weighted mean with weights ``w_i / max(eps, ||v - x_i||)``. Stops after ``max_iter`` steps or
    when the objective improves by less than ``tol`` (relative); then the row nearest the iterate
    is returned instead if its objective is lower (Weiszfeld converges sublinearly when the
    minimiser is a row). Uses ``weights`` (uniform by default). Tolerates any f < n/2; takes no f.

    Scores: Euclidean distance of each row to the output. ``selected``: rows with positive
    weight (all of them contribute to the Weiszfeld average).

    Parameters
    ----------
    max_iter : int
        Maximum Weiszfeld steps.
    eps : float
        Smoothing: distances below ``eps`` count as ``eps`` (avoids division by zero when the
        iterate lands on a row).
    tol : float
        Relative objective improvement below which the iteration stops.
    max_chunk_bytes : int or None
        Bound on float64 temporaries. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = True

    def __init__(
        self,
        max_iter: int = 100,
        eps: float = 1e-8,
        tol: float = 1e-10,
        max_chunk_bytes: Optional[int] = None,
    ) -> None:
        self.max_iter = _positive_int("geometric-median", "max_iter", max_iter)
        self.eps = _positive("geometric-median", "eps", eps)
        self.tol = _positive("geometric-median", "tol", tol)
        self.max_chunk_bytes = check_max_chunk_bytes("geometric-median", max_chunk_bytes)
        #: Weiszfeld steps taken by the last call (for diagnostics).
        self.last_iterations = 0

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("geometric-median", updates)
        w = validate_weights("geometric-median", weights, updates)
        n, d = updates.shape
        alpha = torch.full((n,), 1.0 / n, dtype=torch.float64, device=updates.device) if w is None else w / w.sum()
        centre = torch.empty(d, dtype=torch.float64, device=updates.device)
        weighted_mean_rows(updates, alpha, centre, budget)
        distances = sq_distances_to(updates, centre, budget).sqrt()
        objective = float((alpha * distances).sum())
        self.last_iterations = 0
        for _ in range(self.max_iter):
            beta = alpha / distances.clamp(min=self.eps)
            candidate = torch.empty_like(centre)
            weighted_mean_rows(updates, beta / beta.sum(), candidate, budget)
            new_distances = sq_distances_to(updates, candidate, budget).sqrt()
            new_objective = float((alpha * new_distances).sum())
            self.last_iterations += 1
            if new_objective > objective:
                break  # the smoothing made a step uphill in the true objective: keep the better point
            improvement = objective - new_objective
            centre, distances, objective = candidate, new_distances, new_objective
            if improvement <= self.tol * max(objective, 1e-300):
                break
        # When the minimiser is a row (a majority of identical or near-identical rows, or a
        # heavy weight), Weiszfeld only creeps towards it; evaluate the row nearest the iterate
        # and keep it if it is better by more than rounding (on a flat optimum, e.g. an even
        # number of collinear rows, switching on rounding noise would depend on the row order).
        nearest = int(distances.argmin())
        row_distances = sq_distances_to(updates, updates[nearest], budget).sqrt()
        if float((alpha * row_distances).sum()) < objective * (1 - 1e-12):
            centre, distances = updates[nearest].to(torch.float64), row_distances
        return AggregationResult(centre.to(updates.dtype), distances, alpha > 0)

    def sensitivity(self, clip_norm: float, n: int) -> float:
        """L2 sensitivity ``2C``.

        Proof: the start (a mean) and every Weiszfeld step (a weighted mean with positive
        weights) are convex combinations of the rows, so the output lies in their convex hull,
        hence in the C-ball, before and after replacing a row; two points of the ball are at most
        2C apart.
        """
        return 2.0 * float(clip_norm)


@register("centered-clipping")
class CenteredClipping:
    """Centered clipping (Karimireddy, He & Jaggi, ICML 2021), iterated.

    Starting from the previous call's aggregate ``v`` (zeros on the first call, or after a change
    of d), repeat ``iterations`` times: ``v <- v + (1/n) sum_i clip_tau(x_i - v)`` where
    ``clip_tau`` scales a vector down to norm ``tau``. Stateful: the centre is kept between calls
    and saved by :meth:`state_dict`. Ignores ``weights``. Takes no f.

    Scores: Euclidean distance of each row to the output. ``selected``: all rows (each moves the
    centre by at most ``tau / n``).

    Parameters
    ----------
    tau : float
        Clipping radius around the centre.
    iterations : int
        Clipping iterations per call.
    max_chunk_bytes : int or None
        Bound on float64 temporaries. None: 8 MiB on CPU, 256 MiB on
        other devices (:func:`aggregators.base.chunk_budget`).
    """

    uses_weights = False

    def __init__(self, tau: float = 1.0, iterations: int = 3, max_chunk_bytes: Optional[int] = None) -> None:
        self.tau = _positive("centered-clipping", "tau", tau)
        self.iterations = _positive_int("centered-clipping", "iterations", iterations)
        self.max_chunk_bytes = check_max_chunk_bytes("centered-clipping", max_chunk_bytes)
        self.center: Optional[Tensor] = None

    def __call__(self, updates: Tensor, weights: Optional[Tensor] = None) -> AggregationResult:
        budget = chunk_budget(self.max_chunk_bytes, updates)
        validate_updates("centered-clipping", updates)
        n, d = updates.shape
        if self.center is None or self.center.shape != (d,):
            centre = torch.zeros(d, dtype=torch.float64, device=updates.device)
        else:
            centre = self.center.to(device=updates.device, dtype=torch.float64)
        for _ in range(self.iterations):
            distances = sq_distances_to(updates, centre, budget).sqrt()
            keep = torch.where(distances > self.tau, self.tau / distances.clamp(min=1e-300), torch.ones_like(distances))
            coeffs = keep / n
            # v + sum_i c_i (x_i - v) = (1 - sum c) v + sum_i c_i x_i
            pulled = torch.empty_like(centre)
            weighted_mean_rows(updates, coeffs, pulled, budget)
            centre = (1.0 - float(coeffs.sum())) * centre + pulled
        self.center = centre
        distances = sq_distances_to(updates, centre, budget).sqrt()
        selected = torch.ones(n, dtype=torch.bool, device=updates.device)
        return AggregationResult(centre.to(updates.dtype), distances, selected)

    def sensitivity(self, clip_norm: float, n: int) -> float:
        """L2 sensitivity ``iterations * 2 min(tau, C) / n``, given the starting centre (the
        previous round's released aggregate, i.e. post-processing).

        Proof: one step is ``T(v) = (1/n) sum_i (x_i - g(x_i - v))`` with ``g = I - P`` and ``P``
        the projection onto the tau-ball; ``g`` is nonexpansive, so ``T`` is 1-Lipschitz in
        ``v``. Replacing row i changes ``T(v)`` at a fixed ``v`` by
        ``||P(x_i - v) - P(x_i' - v)|| / n <= min(2 tau, ||x_i - x_i'||) / n <= 2 min(tau, C) / n``.
        By induction the iterates differ by at most ``l * 2 min(tau, C) / n`` after l steps.
        """
        return self.iterations * 2.0 * min(self.tau, float(clip_norm)) / int(n)

    def state_dict(self) -> Dict[str, Any]:
        """``{"center": float64 CPU tensor or None}``."""
        return {"center": None if self.center is None else self.center.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the centre saved by :meth:`state_dict` (validated: 1-D and finite)."""
        center = state.get("center")
        if center is None:
            self.center = None
            return
        center = torch.as_tensor(center, dtype=torch.float64)
        if center.dim() != 1 or not bool(torch.isfinite(center).all()):
            raise ValueError("centered-clipping: saved center must be a finite 1-D tensor")
        self.center = center
