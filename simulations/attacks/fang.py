"""Fang et al.'s full-knowledge local model poisoning, tailored to Krum and to trimmed mean / median.

Both attacks deviate the global model against the direction it would move without attack,
``s = sign(mean of the honest updates)`` per coordinate (the paper's "changing direction"
``s_j``; it is computed from the honest updates, which a full-knowledge attacker has). They
work in update space: the paper's local models are ``w_Re + update`` with ``w_Re`` the global
model the clients received, so distances and signs carry over unchanged.

Threat model (both): full knowledge and collusion. The attackers see every honest update of the
round and know the server's aggregation rule (``fang-krum`` queries the rule itself, passed as
``aggregator``); a simulation-only capability, on the server's interceptor. Fang, Cao, Jia and
Gong, "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning", USENIX Security
2020.
"""

from __future__ import annotations

import math

import torch

from simulations.attacks.base import Aggregator, Attack, as_float, check_craft_inputs
from simulations.attacks.registry import register


def deviation_direction(honest: torch.Tensor) -> torch.Tensor:
    """``s``: the per-coordinate sign of the honest mean (0 where the mean is exactly 0)."""
    return torch.sign(honest.mean(dim=0))


def _uniform(shape: tuple[int, int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) draws in float64 on ``like``'s device, from ``generator`` (drawn on its own device)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64).to(like.device)


def krum_lambda_upper_bound(honest: torch.Tensor, num_malicious: int) -> float:
    """The paper's upper bound on ``lambda`` (Fang et al. 2020, Theorem 1), in update space.

    ``lambda <= min_i sum_{l in G_i} ||g_l - g_i|| / ((m - 2c - 1) sqrt(d)) + max_i ||g_i|| / sqrt(d)``
    with ``m = h + c`` updates, ``c`` of them crafted, ``G_i`` the ``m - c - 2`` honest updates
    nearest to honest update ``g_i``, and ``||g_i||`` its distance to the received global model.
    The first term needs ``m - 2c - 1 >= 1`` (Krum's own condition ``m > 2c + 2`` gives more);
    where it does not hold only the second term is used.
    """
    exact = honest.double()
    h, d = exact.shape
    m, c = h + num_malicious, num_malicious
    furthest = float(exact.norm(dim=1).max()) / math.sqrt(d)
    neighbours = m - c - 2
    if m - 2 * c - 1 < 1 or neighbours < 1 or h < 2:
        return furthest
    distances = torch.cdist(exact, exact, compute_mode="donot_use_mm_for_euclid_dist")
    distances.fill_diagonal_(float("inf"))  # an update is not its own neighbour
    nearest = torch.topk(distances, min(neighbours, h - 1), dim=1, largest=False).values.sum(dim=1)
    return float(nearest.min()) / ((m - 2 * c - 1) * math.sqrt(d)) + furthest


def _selects_crafted(result: object, num_honest: int, crafted: torch.Tensor) -> bool:
    """Whether the rule's output picked a crafted row: by ``selected`` when the result has it,
    else by the aggregate being the first crafted row (a Krum-like rule returning a vector)."""
    selected = getattr(result, "selected", None)
    if selected is not None:
        return bool(torch.as_tensor(selected)[num_honest:].any())
    vector = getattr(result, "vector", result)
    return bool(torch.allclose(vector.double(), crafted[0].double()))


@register("fang-krum")
class FangKrum(Attack):
    """Fang et al.'s full-knowledge attack on Krum (and Multi-Krum): a crafted update far
    against the benign direction that Krum still selects.

    The first attacker sends ``w1 = -lambda * s``; the other ``c - 1`` send supporters within
    ``epsilon`` of it (exact copies for ``epsilon = 0``), which make ``w1`` the update with the
    smallest Krum score. ``lambda`` starts at the paper's upper bound
    (:func:`krum_lambda_upper_bound`) and is halved until the server's rule (``aggregator``)
    selects a crafted update or ``lambda`` falls below ``tolerance`` times the bound; the
    largest ``lambda`` on that grid that is selected is used. Against Multi-Krum the same
    rows are selected among the averaged ones. ``last_lambda`` and ``last_selected`` record the
    latest search (``last_selected`` False: no ``lambda`` on the grid was selected, and the
    smallest one tried is sent).

    The search succeeds when the paper's conditions hold: Krum with ``m > 2c + 2`` and honest
    updates spread out around a small mean, as stochastic non-IID updates are (pairwise
    distances comparable to their norms). Against a tight honest cluster far from the origin no
    ``lambda`` is selected.

    Without an ``aggregator`` the attack searches against Krum with ``f = c``
    (``aggregators.build("krum", num_byzantine=c)``), the paper's setting; when ``m <= 2c + 2``
    that Krum is undefined and the bound itself is sent (``last_selected`` None).

    Threat model: see the module docstring (full knowledge of the honest updates and the
    rule). Fang, Cao, Jia and Gong, USENIX Security 2020, Section 3 (attacking Krum).

    Parameters
    ----------
    epsilon : float
        Distance of the supporters from ``w1``, >= 0 (default 0.0: copies).
    tolerance : float
        Stop halving once ``lambda`` is below this fraction of the upper bound (default 1e-5,
        the paper's threshold, here relative to the bound so that it does not depend on the
        scale of the updates).
    """

    omniscient = True

    def __init__(self, epsilon: float = 0.0, tolerance: float = 1e-5) -> None:
        self.epsilon = as_float(self.name, "epsilon", epsilon, nonnegative=True)
        self.tolerance = as_float(self.name, "tolerance", tolerance, positive=True)
        self.last_lambda: float | None = None
        self.last_selected: bool | None = None

    def _rows(self, direction: torch.Tensor, lam: float, offsets: torch.Tensor) -> torch.Tensor:
        first = -lam * direction
        return torch.cat([first[None, :], first[None, :] + offsets], dim=0)

    def craft(self, honest: torch.Tensor, num_malicious: int, *, aggregator: Aggregator | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        check_craft_inputs(self.name, honest, num_malicious)
        exact = honest.double()
        direction = deviation_direction(exact)
        offsets = torch.zeros(num_malicious - 1, exact.shape[1], dtype=torch.float64, device=exact.device)
        if self.epsilon > 0 and num_malicious > 1:
            noise = _uniform((num_malicious - 1, exact.shape[1]), generator, exact) - 0.5
            offsets = self.epsilon * noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-300)
        rule = aggregator if aggregator is not None else _paper_krum(exact.shape[0] + num_malicious, num_malicious)
        upper = krum_lambda_upper_bound(exact, num_malicious)
        lam = upper
        rows = self._rows(direction, lam, offsets)
        self.last_selected = None
        if rule is not None:
            while True:
                rows = self._rows(direction, lam, offsets)
                stack = torch.cat([honest, rows.to(honest.dtype)], dim=0)
                if _selects_crafted(rule(stack), honest.shape[0], rows.to(honest.dtype)):
                    self.last_selected = True
                    break
                if lam / 2 < self.tolerance * upper:
                    self.last_selected = False
                    break
                lam /= 2
        self.last_lambda = lam
        return rows.to(honest.dtype)


def _paper_krum(num_updates: int, num_malicious: int) -> Aggregator | None:
    """Krum with ``f = c`` (the paper's server), or None where Krum is undefined (``m <= 2c + 2``)."""
    if num_updates <= 2 * num_malicious + 2:
        return None
    import aggregators

    return aggregators.build("krum", num_byzantine=num_malicious)


@register("fang-trimmed-mean")
class FangTrimmedMean(Attack):
    """Fang et al.'s full-knowledge attack on trimmed mean and median: per coordinate, crafted
    values beyond the honest extreme on the side opposite the benign direction.

    For coordinate ``j`` with ``s_j = sign(mean_j)``, ``w_max`` and ``w_min`` the largest and
    smallest honest values, each attacker draws uniformly from

    * ``s_j < 0`` (the model would decrease: push it up): ``[w_max, b * w_max]`` if
      ``w_max > 0``, else ``[w_max, w_max / b]``;
    * ``s_j > 0`` (push it down): ``[w_min / b, w_min]`` if ``w_min > 0``, else
      ``[b * w_min, w_min]``;
    * ``s_j = 0``: the honest mean (there is no direction to attack).

    Every crafted value lies at or beyond the honest extreme, so the trimmed values on that
    side are the largest honest ones or crafted, and the aggregate shifts against ``s`` by more
    than ``c`` naively sign-flipped honest updates would move it. The same crafting is the
    paper's attack on the median. The rule is not queried (``aggregator`` is ignored).

    Threat model: see the module docstring. Fang, Cao, Jia and Gong, USENIX Security 2020,
    Section 3 (attacking trimmed mean and median).

    Parameters
    ----------
    b : float
        Range factor, > 1 (default 2.0, the paper's).
    """

    omniscient = True

    def __init__(self, b: float = 2.0) -> None:
        self.b = as_float(self.name, "b", b)
        if not self.b > 1.0:
            raise ValueError(f"{self.name}: b must be > 1, got {b!r}")

    def intervals(self, honest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-coordinate ``(low, high)`` of the crafted values, float64, shape (d,) each."""
        exact = honest.double()
        direction = deviation_direction(exact)
        top, bottom = exact.max(dim=0).values, exact.min(dim=0).values
        above_low, above_high = top, torch.where(top > 0, top * self.b, top / self.b)
        below_low, below_high = torch.where(bottom > 0, bottom / self.b, bottom * self.b), bottom
        mean = exact.mean(dim=0)
        low = torch.where(direction < 0, above_low, torch.where(direction > 0, below_low, mean))
        high = torch.where(direction < 0, above_high, torch.where(direction > 0, below_high, mean))
        return low, high

    def craft(self, honest: torch.Tensor, num_malicious: int, *, aggregator: Aggregator | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        check_craft_inputs(self.name, honest, num_malicious)
        low, high = self.intervals(honest)
        draws = _uniform((num_malicious, honest.shape[1]), generator, honest)
        return (low + draws * (high - low)).to(honest.dtype)
