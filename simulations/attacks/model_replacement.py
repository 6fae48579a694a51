"""Model replacement (constrain-and-scale): a backdoored model that replaces the global one."""

from __future__ import annotations

import torch

from simulations.attacks.base import Context, as_bool, as_float
from simulations.attacks.data_poisoning import Backdoor
from simulations.attacks.model_poisoning import check_update
from simulations.attacks.server_config import (
    as_margin,
    attackers_per_round,
    cap_norm,
    clients_per_round,
    run_config_of,
    server_norm_bound,
)
from simulations.attacks.registry import register


@register("model-replacement")
class ModelReplacement(Backdoor):
    """Backdoor training, then the update scaled by ``gamma = n / eta`` so that averaging yields
    the attacker's model; the scaled update is constrained to the server's norm bound.

    The attacker trains on its local data with a share of rows carrying the corner-patch trigger
    and relabelled ``target`` (as ``backdoor``), reaching a backdoored model ``X``. Under
    federated averaging ``G' = G + (eta / n) * sum_i (L_i - G)``, so submitting
    ``L = G + gamma * (X - G)`` with ``gamma = n / eta`` makes ``G' = X`` when the other updates
    are close to zero (near convergence): the global model is *replaced* by the attacker's. ``n``
    is the number of updates the server averages a round, ``round(fraction-train * num-clients)``
    from the run config, and ``eta`` the server learning rate (``server_lr``, else the run
    config's ``server-lr``, else 1). The server weights updates by ``num-examples``; the paper's
    ``n / eta`` assumes equal weights, which holds for equal-sized partitions.

    The paper's replacement is one attacker's. With ``a`` colluding attackers expected in a
    round (``round(fraction-train * context.num_attackers)``, at least 1) each scales by
    ``n / (eta * a)`` instead, so that together they replace the global model by the average of
    their backdoored models rather than overshoot it ``a``-fold (which would wreck the model's
    main task and give the backdoor away). With one attacker this is the paper's ``n / eta``.

    Constrain: the paper's attacker also keeps its update inside what the server accepts. Here,
    with ``constrain`` on, a scaled update longer than the server's norm bound
    (``max-update-norm``, and ``clip-norm`` when ``dp`` is on; see
    :mod:`simulations.attacks.server_config`) is shrunk to just inside it (``1 - margin`` of the
    bound), trading full replacement for not being rejected or clipped. The paper's constrain
    also adds an anomaly-detection term to the training loss; that needs a hook into the
    client's training loop, which the attack interface does not have.

    Threat model: the attacker controls its own client's data and update, and knows the
    federation's public configuration (number of clients per round, server learning rate, norm
    bound); it knows neither the other clients' data nor their updates. Bagdasaryan, Veit, Hua,
    Estrin and Shmatikov, "How To Backdoor Federated Learning", AISTATS 2020.

    Parameters
    ----------
    target, fraction, size, value
        The backdoor, as for ``backdoor`` (defaults 0, 0.3, 3, 1.0).
    gamma : float, optional
        Explicit scale; default None: ``n / (eta * a)`` from the context (see above).
    server_lr : float, optional
        The server learning rate ``eta``; default None: the run config's ``server-lr``, else 1.
    constrain : bool
        Shrink the scaled update to just inside the server's norm bound (default True).
    margin : float
        How far inside the bound, as a fraction of it (default 1e-3).
    """

    def __init__(self, target: int = 0, fraction: float = 0.3, size: int = 3, value: float = 1.0,
                 gamma: float | None = None, server_lr: float | None = None, constrain: bool = True,
                 margin: float = 1e-3) -> None:
        super().__init__(target=target, fraction=fraction, size=size, value=value)
        self.gamma = None if gamma is None else as_float(self.name, "gamma", gamma, positive=True)
        self.server_lr = None if server_lr is None else as_float(self.name, "server_lr", server_lr, positive=True)
        self.constrain = as_bool(self.name, "constrain", constrain)
        self.margin = as_margin(self.name, margin)

    def scale_for(self, context: Context) -> float:
        """``gamma``: the explicit one, else ``n / (eta * a)`` from ``context``.

        Raises
        ------
        ValueError
            Without an explicit ``gamma`` when the run config does not give ``num-clients``.
        """
        if self.gamma is not None:
            return self.gamma
        config = run_config_of(context)
        clients = clients_per_round(config, attack=self.name)
        if clients is None:
            raise ValueError(f"{self.name}: gamma = n / eta needs the run config's num-clients (a context), "
                             f"or give gamma explicitly")
        eta = self.server_lr if self.server_lr is not None else as_float(
            self.name, "server-lr", config.get("server-lr", 1.0), positive=True)
        attackers = attackers_per_round(config, int(getattr(context, "num_attackers", 0) or 0), attack=self.name)
        return clients / (eta * attackers)

    def poison_update(self, update: torch.Tensor, *, rng: torch.Generator | None = None,
                      context: Context = None) -> torch.Tensor:
        """``gamma * update``, shrunk to just inside the server's norm bound when ``constrain``."""
        check_update(self.name, update)
        scaled = update * self.scale_for(context)
        bound = server_norm_bound(run_config_of(context), attack=self.name) if self.constrain else None
        return scaled if bound is None else cap_norm(scaled, bound * (1.0 - self.margin))
