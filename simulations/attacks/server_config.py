"""What a client-side attack can read of the server's configuration, and scaling an update to a norm.

Attacking clients read the public run config from their :class:`client.hooks.AttackContext`:
how many updates the server averages a round, and its norm bounds. A Phalanx server bounds the L2 norm of an update in two places: the reply validator rejects an
update whose norm exceeds ``max-update-norm`` (0 = no bound), and with ``dp`` on (``client`` or
``central``) every update is clipped to ``clip-norm``. Both are run-config keys, which an
attacking client reads from its :class:`client.hooks.AttackContext`. With ``adaptive-clip`` the
server moves the clip over the rounds; an attacker only knows the configured starting value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from simulations.attacks.base import Context, as_fraction


def run_config_of(context: Context) -> Mapping[str, Any]:
    """The context's run config, or an empty mapping without a context."""
    config = getattr(context, "run_config", None)
    return config if config is not None else {}


def _number(config: Mapping[str, Any], key: str, default: float, attack: str) -> float:
    value = config.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{attack}: run config {key}={value!r} is not a number") from None


def server_norm_bound(config: Mapping[str, Any], *, attack: str = "attack") -> float | None:
    """The tightest L2 norm the server lets through, from the run config; None when unbounded.

    ``max-update-norm`` when > 0, and ``clip-norm`` when ``dp`` is not ``off``; the smaller of
    the two when both apply.
    """
    bounds = []
    max_update_norm = _number(config, "max-update-norm", 0.0, attack)
    if max_update_norm > 0:
        bounds.append(max_update_norm)
    if str(config.get("dp", "off")) != "off":
        clip = _number(config, "clip-norm", 0.0, attack)
        if clip > 0:
            bounds.append(clip)
    return min(bounds) if bounds else None


def clients_per_round(config: Mapping[str, Any], *, attack: str = "attack") -> int | None:
    """How many updates the server averages a round, ``round(fraction-train * num-clients)``
    (at least 1), as the strategy samples them; None when the config lacks ``num-clients``."""
    if "num-clients" not in config:
        return None
    num_clients = _number(config, "num-clients", 0.0, attack)
    fraction = _number(config, "fraction-train", 1.0, attack)
    return max(1, int(round(fraction * num_clients)))


def attackers_per_round(config: Mapping[str, Any], num_attackers: int, *, attack: str = "attack") -> int:
    """Attackers expected among a round's sampled clients, ``round(fraction-train * num_attackers)``, at least 1."""
    fraction = _number(config, "fraction-train", 1.0, attack)
    return max(1, int(round(fraction * num_attackers)))


def as_margin(attack: str, value: Any) -> float:
    """How far inside a bound an update is placed, as a fraction of the bound: a float in [0, 1)."""
    margin = as_fraction(attack, "margin", value)
    if margin == 1.0:
        raise ValueError(f"{attack}: margin must be < 1, got {value!r}")
    return margin


def scale_to_norm(update: torch.Tensor, norm: float) -> torch.Tensor:
    """``update`` rescaled to L2 norm ``norm`` (never above it, in float64); a zero update stays zero.

    The factor is computed in float64; if rounding to the update's dtype lands above ``norm``,
    the result is shrunk by the measured excess so the bound holds exactly.
    """
    current = float(torch.linalg.vector_norm(update.double()))
    if current == 0.0:
        return update.clone()
    out = (update.double() * (norm / current)).to(update.dtype)
    reached = float(torch.linalg.vector_norm(out.double()))
    if reached > norm:
        shrink = (norm / reached) * (1.0 - 4.0 * torch.finfo(update.dtype).eps)
        out = (out.double() * shrink).to(update.dtype)
    return out


def cap_norm(update: torch.Tensor, norm: float) -> torch.Tensor:
    """``update`` scaled down to norm ``norm`` when it is longer; unchanged otherwise."""
    if float(torch.linalg.vector_norm(update.double())) <= norm:
        return update
    return scale_to_norm(update, norm)
