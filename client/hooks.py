"""Attack hooks, filled by name only when a run's config asks for an attack.

The ClientApp knows no particular attack. When ``attack`` is not ``none`` it imports the attack
plugin module (``simulations.attacks`` by default) and asks it for the attack by name; the
attack then gets two hooks in the client: a data transform (``poison_data``, before training)
and an update transform (``poison_update``, after training). Both receive an
:class:`AttackContext`: what a real attacker in that client would know (the round, its place
among the colluding attackers, the global model it received and the one before, the run
config). A deployed client runs with ``attack = "none"`` and never imports the plugin.

The ClientApp calls, for an attacker (``role.transforms_data`` / ``role.transforms_update``)::

    context = role.context(server_round=r, partition_id=p, global_vector=g, previous_global=g_prev,
                           run_config=context.run_config)
    x, y = role.attack.poison_data(x, y, num_classes=C, image_shape=shape, rng=np_rng, context=context)
    update = role.attack.poison_update(update, rng=torch_generator, context=context)
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
class AttackContext:
    """What an attacking client knows in one round, handed to ``poison_data`` and ``poison_update``.

    Attributes
    ----------
    server_round : int
        The round being trained (1-based).
    partition_id : int
        This client's partition.
    attacker_index : int or None
        Position of this partition among the sorted malicious partitions (0 .. num_attackers-1);
        None for an honest client. Colluding attackers split work by it (DBA's local triggers).
    num_attackers : int
        Number of malicious partitions of the run.
    global_vector : torch.Tensor
        Flat float vector of the model this client received: the floating-point entries of the
        model's ``state_dict``, in order (integer buffers excluded; see
        :func:`client.wire.flat_vector`). Updates passed to ``poison_update`` have this layout.
    previous_global : torch.Tensor or None
        The same for the previous round this client trained in (None the first time). With
        client sampling that round may be several rounds back.
    run_config : Mapping[str, Any]
        The run config, dash-case keys (``"max-update-norm"``, ``"clip-norm"``, ``"dp"``,
        ``"num-clients"``, ``"fraction-train"``, ``"lr"``...).
    """

    server_round: int
    partition_id: int
    attacker_index: int | None
    num_attackers: int
    global_vector: torch.Tensor
    previous_global: torch.Tensor | None
    run_config: Mapping[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.global_vector, torch.Tensor) or self.global_vector.dim() != 1:
            raise ValueError(f"AttackContext: global_vector must be a 1-D tensor, got "
                             f"{getattr(self.global_vector, 'shape', type(self.global_vector).__name__)}")
        if self.previous_global is not None and (
            not isinstance(self.previous_global, torch.Tensor) or self.previous_global.shape != self.global_vector.shape
        ):
            raise ValueError(f"AttackContext: previous_global must match global_vector's shape "
                             f"{tuple(self.global_vector.shape)}, got {getattr(self.previous_global, 'shape', None)}")
        if self.attacker_index is not None and not 0 <= self.attacker_index < self.num_attackers:
            raise ValueError(f"AttackContext: attacker_index={self.attacker_index} is not in "
                             f"[0, num_attackers={self.num_attackers})")

@dataclass(frozen=True)
class AttackRole:
    """What the attack plugin asks of this client.

    Attributes
    ----------
    attack : Any
        The attack object (``poison_data``, ``poison_update``, ``craft``...).
    malicious : bool
        This client is one of the attackers (for ``targets_honest`` attacks: its data source is
        the corrupted one).
    attacker_index : int or None
        Position of this partition among the sorted malicious partitions; None when honest.
    num_attackers : int
        Number of malicious partitions of the run.
    """

    attack: Any
    malicious: bool
    attacker_index: int | None = None
    num_attackers: int = 0

    def context(
        self,
        *,
        server_round: int,
        partition_id: int,
        global_vector: torch.Tensor,
        previous_global: torch.Tensor | None,
        run_config: Mapping[str, Any],
    ) -> AttackContext:
        """This round's :class:`AttackContext` for this client."""
        return AttackContext(server_round=int(server_round), partition_id=int(partition_id),
                             attacker_index=self.attacker_index, num_attackers=self.num_attackers,
                             global_vector=global_vector, previous_global=previous_global, run_config=run_config)

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
    attackers = sorted(plugin.malicious_partitions(num_clients, num_malicious, seed))
    index = attackers.index(partition_id) if partition_id in attackers else None
    return AttackRole(built, index is not None, attacker_index=index, num_attackers=len(attackers))
