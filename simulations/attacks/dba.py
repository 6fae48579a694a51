"""DBA: a distributed backdoor, the global trigger split into local patterns across attackers."""

from __future__ import annotations

from simulations.attacks.base import Context, as_int
from simulations.attacks.data_poisoning import Backdoor
from simulations.attacks.registry import register
from simulations.attacks.triggers import Trigger


@register("dba")
class DBA(Backdoor):
    """Distributed backdoor attack: each attacker stamps only its local part of the trigger.

    The global trigger is the ``size x size`` corner patch of ``backdoor``; it is split into
    ``parts`` disjoint local patterns (its pixels in row-major order cut into contiguous runs:
    with ``parts == size`` each local pattern is one row of the patch, the bars of the paper's
    MNIST trigger). Attacker ``k`` (``context.attacker_index``) stamps local pattern
    ``k mod parts`` on ``round(fraction * N)`` of its rows and relabels them ``target``; no
    attacker ever trains on the full trigger, yet the model learns to map it to ``target``,
    and the server tests the *full* trigger (``triggered_testset``). Each local update looks
    like a weaker, different backdoor, which is what lets DBA slip past defences tuned to one
    centralised trigger. ``boost`` scales the update as in the paper's scaled variant.

    Without a context, or for a client that is not an attacker (``attacker_index`` None), the
    client stamps the full trigger: the centralised backdoor the paper compares against.

    Threat model: several colluding attackers, each controlling its own client's data and
    update; they agree beforehand on the global trigger and its split (by attacker index) and
    know nothing of the honest clients or the rule. Xie, Huang, Chen and Li, "DBA: Distributed
    Backdoor Attacks against Federated Learning", ICLR 2020.

    Parameters
    ----------
    target, fraction, value, boost
        As for ``backdoor`` (defaults 0, 0.3, 1.0, 1.0).
    size : int
        Side of the global trigger patch (default 4: four 1x4 bars with the default ``parts``).
    parts : int
        Number of local patterns, in ``[1, size * size]`` (default 4, as in the paper).
    """

    def __init__(self, target: int = 0, fraction: float = 0.3, size: int = 4, value: float = 1.0,
                 boost: float = 1.0, parts: int = 4) -> None:
        super().__init__(target=target, fraction=fraction, size=size, value=value, boost=boost)
        self.parts = as_int(self.name, "parts", parts, minimum=1)
        if self.parts > self.trigger.size ** 2:
            raise ValueError(f"{self.name}: parts={self.parts} exceeds the {self.trigger.size}x{self.trigger.size} "
                             f"trigger's {self.trigger.size ** 2} pixels")

    def local_triggers(self) -> list[Trigger]:
        """The local patterns, disjoint, whose union is the global trigger."""
        return self.trigger.split(self.parts)

    def trigger_for(self, context: Context) -> Trigger:
        """Local pattern ``attacker_index mod parts``; the full trigger without an attacker index."""
        index = getattr(context, "attacker_index", None)
        if index is None:
            return self.trigger
        return self.local_triggers()[int(index) % self.parts]
