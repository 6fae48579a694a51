"""Adaptive omniscient attacks: ALIE and IPM tuned against the server's own aggregation rule.

Given the rule (``aggregator``: ``rule(updates) -> result`` with ``result.vector``), the attacker
tries a grid of strengths and keeps the one whose aggregate, with the malicious rows appended to
the honest ones, lies furthest from the honest mean (the damage). The fixed attack's strength is
always the first candidate and a later one replaces it only when strictly more damaging, so the
adaptive variant never does less damage than the fixed one against that rule. Without an
aggregator they fall back to the fixed formula.

Threat model: omniscient and colluding attackers who also know the aggregation rule (a
white-box server, as in the adaptive evaluations of Shejwalkar and Houmansadr, NDSS 2021, and
of the "Fall of Empires" epsilon sweep, Xie et al., UAI 2020).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from simulations.attacks.base import Aggregator, as_float, as_int, check_craft_inputs
from simulations.attacks.omniscient import ALIE, IPM, alie_rows, ipm_rows
from simulations.attacks.registry import register


def damage(honest: torch.Tensor, malicious: torch.Tensor, aggregator: Aggregator) -> float:
    """``||aggregator([honest; malicious]).vector - mean(honest)||``, computed in float64."""
    result = aggregator(torch.cat([honest, malicious.to(honest)], dim=0))
    vector = getattr(result, "vector", result)
    return float((vector.double() - honest.double().mean(dim=0)).norm())


def most_damaging(
    honest: torch.Tensor,
    candidates: Sequence[float],
    rows_for: Callable[[float], torch.Tensor],
    aggregator: Aggregator,
) -> tuple[float, torch.Tensor]:
    """The candidate strength (and its rows) of largest damage; ties keep the earliest."""
    best_value, best_rows = candidates[0], rows_for(candidates[0])
    best_damage = damage(honest, best_rows, aggregator)
    for value in candidates[1:]:
        rows = rows_for(value)
        harm = damage(honest, rows, aggregator)
        if harm > best_damage:
            best_value, best_rows, best_damage = value, rows, harm
    return best_value, best_rows


@register("alie-adaptive")
class AdaptiveALIE(ALIE):
    """ALIE with ``z`` chosen against the server's rule: ``mean - z * std`` for the most damaging
    ``z`` among the paper's ``z_max`` (or the given ``z``) and a grid ``linspace(0, z_grid_max, steps)``.

    Threat model: see the module docstring (omniscient, colluding, knows the rule). Baruch et al.,
    NeurIPS 2019, tuned as in Shejwalkar and Houmansadr, NDSS 2021.

    Parameters
    ----------
    z : float, optional
        The fixed attack's ``z`` (first candidate and fallback); default: the paper's formula.
    z_grid_max : float
        Upper end of the grid (default 5.0).
    steps : int
        Grid points, >= 2 (default 41).
    """

    def __init__(self, z: float | None = None, z_grid_max: float = 5.0, steps: int = 41) -> None:
        super().__init__(z)
        self.z_grid_max = as_float(self.name, "z_grid_max", z_grid_max, positive=True)
        self.steps = as_int(self.name, "steps", steps, minimum=2)
        self.last_z: float | None = None  # diagnostics: the z of the latest craft

    def craft(self, honest: torch.Tensor, num_malicious: int, *, aggregator: Aggregator | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        check_craft_inputs(self.name, honest, num_malicious)
        fixed = self.z_for(honest.shape[0], num_malicious)
        if aggregator is None:
            self.last_z = fixed
            return alie_rows(honest, fixed, num_malicious)
        grid = [fixed, *np.linspace(0.0, self.z_grid_max, self.steps).tolist()]
        self.last_z, rows = most_damaging(honest, grid, lambda z: alie_rows(honest, z, num_malicious), aggregator)
        return rows


@register("ipm-adaptive")
class AdaptiveIPM(IPM):
    """IPM with ``epsilon`` chosen against the server's rule: ``-epsilon * mean`` for the most
    damaging ``epsilon`` among the given one and a geometric grid from ``min_epsilon`` to
    ``max_epsilon``.

    Threat model: see the module docstring. Xie, Koyejo and Gupta, UAI 2020.

    Parameters
    ----------
    epsilon : float
        The fixed attack's epsilon (first candidate and fallback; default 0.1).
    min_epsilon, max_epsilon : float
        Ends of the geometric grid (defaults 0.01 and 10.0).
    steps : int
        Grid points, >= 2 (default 25).
    """

    def __init__(self, epsilon: float = 0.1, min_epsilon: float = 0.01, max_epsilon: float = 10.0, steps: int = 25) -> None:
        super().__init__(epsilon)
        self.min_epsilon = as_float(self.name, "min_epsilon", min_epsilon, positive=True)
        self.max_epsilon = as_float(self.name, "max_epsilon", max_epsilon, positive=True)
        if self.max_epsilon < self.min_epsilon:
            raise ValueError(f"{self.name}: max_epsilon={max_epsilon} is below min_epsilon={min_epsilon}")
        self.steps = as_int(self.name, "steps", steps, minimum=2)
        self.last_epsilon: float | None = None  # diagnostics: the epsilon of the latest craft

    def craft(self, honest: torch.Tensor, num_malicious: int, *, aggregator: Aggregator | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        check_craft_inputs(self.name, honest, num_malicious)
        if aggregator is None:
            self.last_epsilon = self.epsilon
            return ipm_rows(honest, self.epsilon, num_malicious)
        grid = [self.epsilon, *np.geomspace(self.min_epsilon, self.max_epsilon, self.steps).tolist()]
        self.last_epsilon, rows = most_damaging(honest, grid, lambda e: ipm_rows(honest, e, num_malicious), aggregator)
        return rows
