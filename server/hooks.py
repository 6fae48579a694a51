"""Server-side attack hooks, filled by name only when a run's config asks for an attack.

In simulation, omniscient attackers (ALIE, IPM, min-max...) need the honest updates. They get
them through one clearly named pre-aggregation interceptor, ``SimulatedAttack.intercept``,
which replaces the malicious nodes' rows of the update stack before aggregation. A deployed
server runs with ``attack = "none"``: no hook, and the attack plugin is never imported.
The same object tells the simulation's reports which nodes were the attackers (ground truth
for detection quality) and gives the triggered test set for a backdoor's attack-success rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from client.hooks import attack_plugin


@dataclass
class SimulatedAttack:
    """A simulated attack as the server sees it (simulation only).

    Attributes
    ----------
    attack : Any
        The attack object built by the plugin.
    malicious_partitions : set[int]
        Partition ids of the attackers.
    node_partitions : dict[int, int]
        Node id -> partition id, learnt from the replies' ``partition-id`` metric.
    """

    attack: Any
    malicious_partitions: set[int]
    node_partitions: dict[int, int] = field(default_factory=dict)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    start_round: int = 1

    def observe(self, node_ids: list[int], metrics: list[dict]) -> None:
        """Remember which partition each replying node holds."""
        for node, values in zip(node_ids, metrics):
            if "partition-id" in values:
                self.node_partitions[int(node)] = int(values["partition-id"])

    @property
    def malicious_nodes(self) -> set[int]:
        """Node ids of the attackers seen so far."""
        return {n for n, p in self.node_partitions.items() if p in self.malicious_partitions}

    def intercept(
        self, server_round: int, updates: torch.Tensor, node_ids: list[int], metrics: list[dict], aggregator: Callable
    ) -> torch.Tensor:
        """Replace the attackers' rows by updates crafted from the honest rows (omniscient attacks)."""
        self.observe(node_ids, metrics)
        if not getattr(self.attack, "omniscient", False) or server_round < self.start_round:
            return updates
        mask = torch.tensor([n in self.malicious_nodes for n in node_ids], device=updates.device)
        num_malicious = int(mask.sum())
        if num_malicious == 0 or num_malicious == len(node_ids):
            return updates
        crafted = self.attack.craft(updates[~mask], num_malicious, aggregator=aggregator, generator=self.generator)
        out = updates.clone()
        out[mask] = crafted.to(out)
        return out


def simulated_attack(
    attack: str, attack_params: str, *, num_clients: int, num_malicious: int, seed: int, start_round: int = 1
) -> SimulatedAttack | None:
    """The run's simulated attack, or None when its config names none."""
    if attack in ("", "none"):
        return None
    plugin = attack_plugin()
    built = plugin.build(attack, **plugin.parse_params(attack_params))
    malicious = set(plugin.malicious_partitions(num_clients, num_malicious, seed))
    return SimulatedAttack(built, malicious, generator=torch.Generator().manual_seed(seed), start_round=start_round)
