"""Non-omniscient model poisoning: a malicious client rewrites its own update after training.

These attacks see only their own update (``trained - global``, flat, shape (d,)); they run in
the malicious ClientApp through ``poison_update`` and ignore its ``context``.
"""

from __future__ import annotations

import torch

from simulations.attacks.base import Attack, Context, as_float
from simulations.attacks.registry import register


def check_update(attack: str, update: torch.Tensor) -> None:
    """Reject an update that is not a floating tensor."""
    if not isinstance(update, torch.Tensor) or not update.is_floating_point():
        raise ValueError(f"{attack}: update must be a floating torch.Tensor, got {getattr(update, 'dtype', type(update).__name__)}")


@register("sign-flip")
class SignFlip(Attack):
    """Send the negated update, scaled: ``-scale * update``.

    Threat model: the attacker controls its own client's update and nothing else; it pushes the
    model up the loss (gradient ascent). Damaskinos et al., "Asynchronous Byzantine Machine
    Learning", ICML 2018; Allen-Zhu et al., ICLR 2021 (sign-flipping attack). The foundation's
    default run uses ``scale=10``.

    Parameters
    ----------
    scale : float
        Positive factor (default 1.0: a plain sign flip).
    """

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = as_float(self.name, "scale", scale, positive=True)

    def poison_update(self, update: torch.Tensor, *, rng: torch.Generator | None = None,
                      context: Context = None) -> torch.Tensor:
        """``-scale * update``."""
        check_update(self.name, update)
        return update * (-self.scale)


@register("scaling")
class Scaling(Attack):
    """Send the update multiplied by ``scale`` so that it dominates an average.

    Threat model: the attacker controls its own update; it exploits rules whose output moves
    linearly with one input (the mean). Bhagoji et al., "Analyzing Federated Learning through an
    Adversarial Lens", ICML 2019 (explicit boosting).

    Parameters
    ----------
    scale : float
        Positive factor (default 10.0).
    """

    def __init__(self, scale: float = 10.0) -> None:
        self.scale = as_float(self.name, "scale", scale, positive=True)

    def poison_update(self, update: torch.Tensor, *, rng: torch.Generator | None = None,
                      context: Context = None) -> torch.Tensor:
        """``scale * update``."""
        check_update(self.name, update)
        return update * self.scale


@register("gaussian")
class Gaussian(Attack):
    """Replace the update by Gaussian noise ``N(0, std^2 I)``, drawn from the client's generator.

    Threat model: a faulty or malicious client that sends random updates; it needs no knowledge
    at all. Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent" (Krum), NeurIPS 2017 (Gaussian Byzantine workers).

    Parameters
    ----------
    std : float
        Standard deviation of every coordinate, >= 0 (default 1.0).
    """

    def __init__(self, std: float = 1.0) -> None:
        self.std = as_float(self.name, "std", std, nonnegative=True)

    def poison_update(self, update: torch.Tensor, *, rng: torch.Generator | None = None,
                      context: Context = None) -> torch.Tensor:
        """Noise of ``update``'s shape, device and dtype; reproducible for a seeded ``rng``."""
        check_update(self.name, update)
        device = rng.device if rng is not None else torch.device("cpu")
        # Drawn on the generator's device (a CPU generator cannot fill a CUDA tensor), then moved.
        noise = torch.randn(update.shape, generator=rng, device=device, dtype=update.dtype)
        return (noise * self.std).to(update.device)
