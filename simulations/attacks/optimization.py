"""Omniscient attacks found by search: min-max and min-sum (Shejwalkar & Houmansadr, NDSS 2021).

Both send ``mean + gamma * p`` where ``mean`` is the honest mean and ``p`` a fixed perturbation
direction, with the largest ``gamma`` that keeps the malicious update as close to the honest
updates as the honest updates are to each other:

* min-max: ``max_i ||m - g_i|| <= max_{i,j} ||g_i - g_j||``;
* min-sum: ``sum_i ||m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2``.

Both objectives are convex in ``gamma`` and hold at ``gamma = 0``, so the feasible set is an
interval ``[0, gamma*]``; the search doubles ``gamma`` until it fails, then bisects to a relative
``tolerance``. Distances are evaluated in float64 through the expansion
``||mean + gamma p - g_i||^2 = a_i + 2 gamma b_i + gamma^2 c`` so each step costs O(h), not O(h d).
"""

from __future__ import annotations

from typing import Callable

import torch

from simulations.attacks.base import Aggregator, Attack, as_choice, as_float, check_craft_inputs
from simulations.attacks.omniscient import coordinate_std
from simulations.attacks.registry import register

#: Perturbation directions of the paper: inverse unit vector, inverse std, inverse sign.
PERTURBATIONS = ("std", "sign", "unit-vec")

#: Bound on search steps: ample for float64, and it ends a search whose answer is gamma = 0.
_MAX_STEPS = 200


def perturbation_direction(honest: torch.Tensor, kind: str) -> torch.Tensor:
    """The direction ``p`` (shape (d,)) of ``mean + gamma * p``.

    ``"unit-vec"``: ``-mean / ||mean||``; ``"std"``: ``-std`` per coordinate; ``"sign"``:
    ``-sign(mean)``. A zero mean gives a zero direction for ``"unit-vec"``.
    """
    mean = honest.mean(dim=0)
    if kind == "unit-vec":
        norm = mean.norm()
        return -mean / norm if bool(norm > 0) else torch.zeros_like(mean)
    if kind == "std":
        return -coordinate_std(honest)
    if kind == "sign":
        return -torch.sign(mean)
    raise ValueError(f"unknown perturbation {kind!r}; choose one of {list(PERTURBATIONS)}")


def largest_feasible(feasible: Callable[[float], bool], start: float, tolerance: float) -> float:
    """Largest ``gamma >= 0`` with ``feasible(gamma)``, assuming ``{gamma: feasible}`` is ``[0, gamma*]``.

    Doubles from ``start`` until infeasible, then bisects until the bracket is within
    ``tolerance`` relative to its upper end. Returns a gamma that was checked feasible
    (0 when nothing larger is).
    """
    low, high = 0.0, start
    steps = 0
    while feasible(high):
        low, high = high, 2.0 * high
        steps += 1
        if steps >= _MAX_STEPS:  # never infeasible: the direction does not move the objective
            return low
    while high - low > tolerance * high and steps < _MAX_STEPS:
        middle = 0.5 * (low + high)
        if feasible(middle):
            low = middle
        else:
            high = middle
        steps += 1
    return low


class _GammaSearch(Attack):
    """Shared machinery of min-max and min-sum: ``mean + gamma * p`` with a searched gamma."""

    omniscient = True

    def __init__(self, perturbation: str = "std", gamma_init: float = 10.0, tolerance: float = 1e-5) -> None:
        self.perturbation = as_choice(self.name, "perturbation", perturbation, PERTURBATIONS)
        self.gamma_init = as_float(self.name, "gamma_init", gamma_init, positive=True)
        self.tolerance = as_float(self.name, "tolerance", tolerance, positive=True)

    def _feasible(self, a: torch.Tensor, b: torch.Tensor, c: float, pairwise_sq: torch.Tensor) -> Callable[[float], bool]:
        raise NotImplementedError

    def gamma(self, honest: torch.Tensor) -> float:
        """The searched gamma for this honest stack (the largest feasible, up to ``tolerance``)."""
        check_craft_inputs(self.name, honest, 1)
        exact = honest.double()
        mean = exact.mean(dim=0)
        direction = perturbation_direction(exact, self.perturbation)
        offsets = mean - exact                     # (h, d): mean - g_i
        a = (offsets * offsets).sum(dim=1)         # ||mean - g_i||^2
        b = offsets @ direction                    # <mean - g_i, p>
        c = float(direction @ direction)           # ||p||^2
        if c == 0.0:
            return 0.0  # no direction to move in
        pairwise_sq = torch.cdist(exact, exact, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        return largest_feasible(self._feasible(a, b, c, pairwise_sq), self.gamma_init, self.tolerance)

    def craft(self, honest: torch.Tensor, num_malicious: int, *, aggregator: Aggregator | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        check_craft_inputs(self.name, honest, num_malicious)
        gamma = self.gamma(honest)
        exact = honest.double()
        row = exact.mean(dim=0) + gamma * perturbation_direction(exact, self.perturbation)
        return row.to(honest.dtype).expand(num_malicious, -1).clone()


@register("min-max")
class MinMax(_GammaSearch):
    """Min-max: the largest push along ``p`` whose distance to every honest update stays within
    the largest distance between two honest updates.

    Threat model: omniscient and colluding (the attackers see the honest updates of the round)
    but agnostic of the aggregation rule. Shejwalkar and Houmansadr, "Manipulating the Byzantine:
    Optimizing Model Poisoning Attacks and Defenses for Federated Learning", NDSS 2021.

    Parameters
    ----------
    perturbation : {"std", "sign", "unit-vec"}
        ``p``: inverse standard deviation (default), inverse sign of the mean, or inverse unit
        vector of the mean.
    gamma_init : float
        First gamma tried (default 10.0, as in the paper).
    tolerance : float
        Relative width of the final bisection bracket (default 1e-5).
    """

    def _feasible(self, a: torch.Tensor, b: torch.Tensor, c: float, pairwise_sq: torch.Tensor) -> Callable[[float], bool]:
        threshold = float(pairwise_sq.max())
        return lambda gamma: float((a + 2.0 * gamma * b + gamma * gamma * c).max()) <= threshold


@register("min-sum")
class MinSum(_GammaSearch):
    """Min-sum: the largest push along ``p`` whose sum of squared distances to the honest updates
    stays within the largest such sum of an honest update.

    Threat model and parameters as for ``min-max`` (Shejwalkar and Houmansadr, NDSS 2021).
    """

    def _feasible(self, a: torch.Tensor, b: torch.Tensor, c: float, pairwise_sq: torch.Tensor) -> Callable[[float], bool]:
        threshold = float(pairwise_sq.sum(dim=1).max())
        total_a, total_b, count = float(a.sum()), float(b.sum()), a.numel()
        return lambda gamma: total_a + 2.0 * gamma * total_b + count * gamma * gamma * c <= threshold
