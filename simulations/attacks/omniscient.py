"""Omniscient model poisoning with a closed form: ALIE, IPM and mimic.

These attackers see every honest update of the round (a simulation-only capability: the server's
interceptor hands them the honest rows) and send updates computed from them. All malicious rows
of a round are identical unless stated otherwise. ``n = h + num_malicious`` is the total number of
updates where a formula needs it.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from simulations.attacks.base import Aggregator, Attack, as_float, as_int, check_craft_inputs
from simulations.attacks.registry import register


def alie_z(num_clients: int, num_malicious: int) -> float:
    """ALIE's ``z_max`` from the number of clients n and of attackers f (Baruch et al. 2019, Alg. 3).

    ``s = floor(n / 2 + 1) - f`` honest "supporters" are needed for a majority; ``z`` is the
    largest number of standard deviations such that ``s`` honest updates still lie further from
    the mean: ``z = Phi^{-1}((n - s) / n)``. The paper assumes an honest majority; when
    ``s < 1`` (f >= n/2 + 1) the formula is undefined and ``s`` is clamped to 1.
    """
    if not 1 <= num_malicious < num_clients:
        raise ValueError(f"alie: need 1 <= f < n (at least one honest client), got n={num_clients}, f={num_malicious}")
    # With f >= 1, s <= floor(n/2) < n, so (n - s) / n lies in (0, 1) and z is finite.
    supporters = max(math.floor(num_clients / 2 + 1) - num_malicious, 1)
    return NormalDist().inv_cdf((num_clients - supporters) / num_clients)


def coordinate_std(honest: torch.Tensor) -> torch.Tensor:
    """Per-coordinate sample standard deviation (Bessel-corrected; zeros for a single row)."""
    if honest.shape[0] < 2:
        return torch.zeros_like(honest[0])
    return honest.std(dim=0, correction=1)


def alie_rows(honest: torch.Tensor, z: float, num_malicious: int) -> torch.Tensor:
    """``num_malicious`` copies of ``mean - z * std`` (per coordinate, over the honest rows)."""
    row = honest.mean(dim=0) - z * coordinate_std(honest)
    return row.expand(num_malicious, -1).clone()


def ipm_rows(honest: torch.Tensor, epsilon: float, num_malicious: int) -> torch.Tensor:
    """``num_malicious`` copies of ``-epsilon * mean(honest)``."""
    row = honest.mean(dim=0) * (-epsilon)
    return row.expand(num_malicious, -1).clone()


@register("alie")
class ALIE(Attack):
    """A Little Is Enough: every attacker sends ``mean - z * std`` of the honest updates.

    Small coordinate-wise shifts, within the honest spread, that robust rules cannot tell from
    honest noise but that add up over rounds. ``z`` comes from the paper's formula
    (:func:`alie_z`) with ``n = h + num_malicious`` and ``f = num_malicious``, unless given.

    Threat model: omniscient and colluding; the attackers know the mean and per-coordinate
    standard deviation of the honest updates (or estimate them from their own data), not the
    aggregation rule. Baruch, Baruch and Goldberg, "A Little Is Enough: Circumventing Defenses
    For Distributed Learning", NeurIPS 2019.

    Parameters
    ----------
    z : float, optional
        Number of standard deviations; default None: the paper's ``z_max``.
    """

    omniscient = True

    def __init__(self, z: float | None = None) -> None:
        self.z = None if z is None else as_float(self.name, "z", z)

    def z_for(self, num_honest: int, num_malicious: int) -> float:
        """The ``z`` used with ``num_honest`` honest and ``num_malicious`` malicious updates."""
        return self.z if self.z is not None else alie_z(num_honest + num_malicious, num_malicious)

    def craft(self, honest: torch.Tensor, num_malicious: int, *, aggregator: Aggregator | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        check_craft_inputs(self.name, honest, num_malicious)
        return alie_rows(honest, self.z_for(honest.shape[0], num_malicious), num_malicious)


@register("ipm")
class IPM(Attack):
    """Inner-product manipulation: every attacker sends ``-epsilon * mean`` of the honest updates.

    With small ``epsilon`` the malicious updates sit close to the origin, inside the honest spread,
    yet make the inner product of the aggregate with the true gradient negative.

    Threat model: omniscient and colluding; the attackers know the honest mean, not the rule.
    Xie, Koyejo and Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
    Manipulation", UAI 2020.

    Parameters
    ----------
    epsilon : float
        Positive factor (default 0.1, the paper's setting against median and Krum).
    """

    omniscient = True

    def __init__(self, epsilon: float = 0.1) -> None:
        self.epsilon = as_float(self.name, "epsilon", epsilon, positive=True)

    def craft(self, honest: torch.Tensor, num_malicious: int, *, aggregator: Aggregator | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        check_craft_inputs(self.name, honest, num_malicious)
        return ipm_rows(honest, self.epsilon, num_malicious)


@register("mimic")
class Mimic(Attack):
    """Every attacker copies one honest update, over-weighting that client in the aggregate.

    Under data heterogeneity this biases training towards one client's data while every
    malicious update is a genuine honest one, so no distance-based rule can reject it.
    The copied client is chosen deterministically: ``index`` when given, else the honest row with
    the largest absolute projection on the top principal direction of the centred honest stack
    (the direction of largest variance, i.e. of heterogeneity). The paper fixes that choice after
    a warm-up phase; here it is made afresh from each round's updates.

    Threat model: omniscient and colluding; the attackers see the honest updates of the round.
    Karimireddy, He and Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing", ICLR 2022.

    Parameters
    ----------
    index : int, optional
        Row of the honest stack to copy; default None: the heuristic above.
    """

    omniscient = True

    def __init__(self, index: int | None = None) -> None:
        self.index = None if index is None else as_int(self.name, "index", index, minimum=0)

    def victim(self, honest: torch.Tensor) -> int:
        """Index of the honest row the attackers copy."""
        if self.index is not None:
            if self.index >= honest.shape[0]:
                raise ValueError(f"{self.name}: index={self.index} but there are only {honest.shape[0]} honest updates")
            return self.index
        centred = (honest - honest.mean(dim=0)).double()
        gram = centred @ centred.T
        if not bool(gram.abs().max() > 0):
            return 0  # all honest updates equal: any copy is the same
        # Projections on the top principal direction are proportional to the top eigenvector
        # of the (h, h) Gram matrix: no (d, d) covariance is formed.
        _, vectors = torch.linalg.eigh(gram)
        return int(vectors[:, -1].abs().argmax())

    def craft(self, honest: torch.Tensor, num_malicious: int, *, aggregator: Aggregator | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        check_craft_inputs(self.name, honest, num_malicious)
        return honest[self.victim(honest)].expand(num_malicious, -1).clone()
