"""A backdoor whose update stays inside the server's norm bound, scaled up to just inside it."""

from __future__ import annotations

import torch

from simulations.attacks.base import Context, as_float
from simulations.attacks.data_poisoning import Backdoor
from simulations.attacks.model_poisoning import check_update
from simulations.attacks.server_config import as_margin, run_config_of, scale_to_norm, server_norm_bound
from simulations.attacks.registry import register


@register("norm-bounded-backdoor")
class NormBoundedBackdoor(Backdoor):
    """Backdoor training, then the update rescaled to just inside the server's norm bound.

    Norm clipping and norm-based rejection are the cheap defences against boosted backdoors; an
    attacker who knows the bound ``M`` sends the longest update that passes, ``M (1 - margin)``:
    a shorter raw update is scaled up (boosting as far as the server allows), a longer one down
    (instead of being clipped or rejected). The bound is the explicit ``norm`` when given, else
    read from ``context.run_config``: ``max-update-norm`` when > 0 and, with ``dp`` on, the
    ``clip-norm`` (the smaller when both apply; :mod:`simulations.attacks.server_config`).

    With no bound known (no ``norm``, and neither key sets one, or no context) the server
    accepts any norm; the attacker then sends its raw backdoor update unchanged (it acts as
    ``backdoor``) and ``last_bound`` is None, since boosting without a bound is
    ``model-replacement``'s job.

    Threat model: the attacker controls its own client's data and update and knows the server's
    norm bound (public configuration); it knows neither the other clients' data nor their
    updates. Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?",
    2019 (norm-bounded attackers against norm clipping and weak DP).

    Parameters
    ----------
    target, fraction, size, value
        The backdoor, as for ``backdoor`` (defaults 0, 0.3, 3, 1.0).
    norm : float, optional
        The bound the attacker assumes; default None: the server's, from the run config.
    margin : float
        How far inside the bound, as a fraction of it (default 1e-3).
    """

    def __init__(self, target: int = 0, fraction: float = 0.3, size: int = 3, value: float = 1.0,
                 norm: float | None = None, margin: float = 1e-3) -> None:
        super().__init__(target=target, fraction=fraction, size=size, value=value)
        self.norm = None if norm is None else as_float(self.name, "norm", norm, positive=True)
        self.margin = as_margin(self.name, margin)
        self.last_bound: float | None = None  # diagnostics: the bound of the latest update

    def bound_for(self, context: Context) -> float | None:
        """The norm bound the update is fitted to: ``norm``, else the server's; None when unbounded."""
        if self.norm is not None:
            return self.norm
        return server_norm_bound(run_config_of(context), attack=self.name)

    def poison_update(self, update: torch.Tensor, *, rng: torch.Generator | None = None,
                      context: Context = None) -> torch.Tensor:
        """The update rescaled to norm ``bound * (1 - margin)``; unchanged when no bound is known."""
        check_update(self.name, update)
        self.last_bound = self.bound_for(context)
        if self.last_bound is None:
            return update
        return scale_to_norm(update, self.last_bound * (1.0 - self.margin))
