"""Attack hooks, filled by name only when a run's config asks for an attack.

The ClientApp knows no particular attack. When ``attack`` is not ``none`` it imports the attack
plugin module (``simulations.attacks`` by default) and asks it for the attack by name; the
attack then gets two hooks in the client: a data transform (``poison_data``, before training)
and an update transform (``poison_update``, after training). A deployed client runs with
``attack = "none"`` and never imports the plugin.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch

#: Module that provides ``build``, ``parse_params`` and ``malicious_partitions``.
ATTACK_PLUGIN = "simulations.attacks"


@dataclass(frozen=True)
class AttackRole:
    """What the attack plugin asks of this client.

    Attributes
    ----------
    attack : Any
        The attack object (``poison_data``, ``poison_update``, ``craft``...).
    malicious : bool
        This client is one of the attackers.
    """

    attack: Any
    malicious: bool
    attacker_index: int | None = None

    @property
    def transforms_data(self) -> bool:
        """Poison this client's training data before it trains.

        For attacks on honest clients' data sources (``targets_honest``, e.g.
        ``corrupted-source``) the chosen partitions are those whose source is corrupted: the
        clients themselves stay honest.
        """
        return self.malicious

    @property
    def transforms_update(self) -> bool:
        """Transform this client's update after training (non-omniscient model poisoning)."""
        honest_client = getattr(self.attack, "targets_honest", False)
        return self.malicious and not honest_client and not getattr(self.attack, "omniscient", False)


@dataclass(frozen=True)
class AttackContext:
    """What an attacking client knows in a round, passed to its hooks as ``context``.

    Attributes
    ----------
    server_round : int
    partition_id : int
    attacker_index : int | None
        Position of this partition among the sorted malicious partitions; None when honest.
    num_attackers : int
    global_vector : torch.Tensor
        Flat floating-point state of the model this client received (``client.wire.flat_vector``).
    previous_global : torch.Tensor | None
        The same for the previous round this client trained in (None the first time).
    run_config : Mapping
        The run config (dash-case keys).
    """

    server_round: int
    partition_id: int
    attacker_index: int | None
    num_attackers: int
    global_vector: torch.Tensor
    previous_global: torch.Tensor | None
    run_config: Mapping[str, Any]


@lru_cache(maxsize=8)
def attack_plugin(module_name: str = ATTACK_PLUGIN) -> ModuleType:
    """Import the attack plugin module by name."""
    return importlib.import_module(module_name)


def attack_role(
    attack: str, attack_params: str, *, partition_id: int, num_clients: int, num_malicious: int, seed: int
) -> AttackRole | None:
    """The attack this client takes part in, or None when the run has no attack."""
    if attack in ("", "none"):
        return None
    plugin = attack_plugin()
    built = plugin.build(attack, **plugin.parse_params(attack_params))
    attackers = sorted(int(p) for p in plugin.malicious_partitions(num_clients, num_malicious, seed))
    malicious = partition_id in attackers
    return AttackRole(built, malicious, attackers.index(partition_id) if malicious else None)
