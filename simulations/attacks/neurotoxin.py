"""Neurotoxin: a durable backdoor confined to the coordinates honest clients rarely change."""

from __future__ import annotations

import torch

from simulations.attacks.base import Context, as_bool, as_fraction
from simulations.attacks.data_poisoning import Backdoor
from simulations.attacks.model_poisoning import check_update
from simulations.attacks.server_config import as_margin, cap_norm, run_config_of, server_norm_bound
from simulations.attacks.registry import register


def bottom_k_mask(benign_change: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of exactly ``keep`` coordinates of smallest ``|benign_change|`` (ties: any)."""
    mask = torch.zeros(benign_change.shape, dtype=torch.bool, device=benign_change.device)
    if keep > 0:
        mask[torch.topk(benign_change.abs(), keep, largest=False, sorted=False).indices] = True
    return mask


@register("neurotoxin")
class Neurotoxin(Backdoor):
    """A backdoor whose update lives only on the coordinates benign training rarely moves.

    The attacker trains on backdoored data (the corner-patch trigger of ``backdoor``), then
    keeps its update only on the ``mask_ratio`` share of coordinates where the benign aggregate
    changed least, and zeroes it elsewhere. As in the paper, the benign change is estimated by
    the last global update the attacker saw, ``|context.global_vector - context.previous_global|``
    (with client sampling that spans every round since this client last trained). Coordinates
    honest clients rarely change are rarely overwritten, so the backdoor outlives the attack.
    With ``constrain`` on, the masked update is then shrunk to just inside the server's norm
    bound (``max-update-norm``, ``clip-norm`` with ``dp``), the norm constraint the paper runs
    under.

    First round (no ``previous_global``, or no context): there is no benign change to estimate
    the mask from, so the attacker sends its unmasked backdoor update (it acts as ``backdoor``)
    and ``last_mask_size`` is None.

    The paper projects the gradient onto the mask at every local step (projected gradient
    descent); the attack interface sees only the final update, so here the mask is applied to
    the update once after training. The result has the paper's defining property (zero outside
    the mask) but its inside-mask values come from unconstrained training.

    Threat model: the attacker controls its own client's data and update and sees the global
    models it receives (hence their difference); it knows neither the honest updates nor the
    rule. Zhang, Panda, Song, Yang, Mahoney, Mittal, Ramchandran and Gonzalez, "Neurotoxin:
    Durable Backdoors in Federated Learning", ICML 2022.

    Parameters
    ----------
    target, fraction, size, value
        The backdoor, as for ``backdoor`` (defaults 0, 0.3, 3, 1.0).
    mask_ratio : float
        Share of coordinates the attacker keeps, those of smallest benign change, in [0, 1]
        (default 0.95, the paper's gradmask ratio: the top 5% are left to the honest clients).
    constrain : bool
        Shrink the masked update to just inside the server's norm bound (default True).
    margin : float
        How far inside the bound, as a fraction of it (default 1e-3).
    """

    def __init__(self, target: int = 0, fraction: float = 0.3, size: int = 3, value: float = 1.0,
                 mask_ratio: float = 0.95, constrain: bool = True, margin: float = 1e-3) -> None:
        super().__init__(target=target, fraction=fraction, size=size, value=value)
        self.mask_ratio = as_fraction(self.name, "mask_ratio", mask_ratio)
        self.constrain = as_bool(self.name, "constrain", constrain)
        self.margin = as_margin(self.name, margin)
        self.last_mask_size: int | None = None  # diagnostics: coordinates kept in the latest update

    def mask_for(self, context: Context) -> torch.Tensor | None:
        """The kept coordinates (bool, the global vector's shape), or None in the first round."""
        previous = getattr(context, "previous_global", None)
        if previous is None:
            return None
        change = context.global_vector.double() - previous.double()
        return bottom_k_mask(change, int(round(self.mask_ratio * change.numel())))

    def poison_update(self, update: torch.Tensor, *, rng: torch.Generator | None = None,
                      context: Context = None) -> torch.Tensor:
        """The update zeroed outside :meth:`mask_for`, then constrained to the server's bound."""
        check_update(self.name, update)
        mask = self.mask_for(context)
        if mask is not None and mask.shape != update.shape:
            raise ValueError(f"{self.name}: update of shape {tuple(update.shape)} does not match the global "
                             f"vector's {tuple(mask.shape)}")
        self.last_mask_size = None if mask is None else int(mask.sum())
        out = update if mask is None else torch.where(mask.to(update.device), update, torch.zeros_like(update))
        bound = server_norm_bound(run_config_of(context), attack=self.name) if self.constrain else None
        return out if bound is None else cap_norm(out, bound * (1.0 - self.margin))
