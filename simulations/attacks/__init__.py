"""Phalanx's simulated attacks, loaded by name by the ClientApp and the ServerApp.

>>> from simulations import attacks
>>> attack = attacks.build("sign-flip", **attacks.parse_params("scale=10"))
>>> attacks.malicious_partitions(10, 2, seed=0) == attacks.malicious_partitions(10, 2, seed=0)
True

Families (each class docstring cites its paper and states its threat model):

* data poisoning, in malicious clients (``poison_data``): ``label-flip``,
  ``targeted-label-flip``, ``backdoor`` (also boosts its update with ``boost > 1``);
* backdoors that also shape their update (``poison_data`` and ``poison_update``, reading the
  round's ``context``): ``model-replacement`` (constrain-and-scale), ``dba`` (the trigger split
  across the attackers), ``neurotoxin`` (the update confined to rarely-changed coordinates),
  ``norm-bounded-backdoor`` (the update fitted to the server's norm bound);
* a tampered data source at honest clients (``targets_honest = True``): ``corrupted-source``;
* model poisoning, in malicious clients (``poison_update``): ``sign-flip``, ``scaling``, ``gaussian``;
* omniscient model poisoning, on the server's simulation interceptor (``craft``): ``alie``,
  ``ipm``, ``min-max``, ``min-sum``, ``mimic``, and the rule-aware ``alie-adaptive``,
  ``ipm-adaptive``, ``fang-krum``, ``fang-trimmed-mean``.

New attacks subclass :class:`Attack` and register with ``@register("name")``.
"""

from simulations.attacks.base import Attack
from simulations.attacks.registry import available, build, parameters, parse_params, register
from simulations.attacks.selection import malicious_partitions

# Importing the attack modules registers their attacks.
from simulations.attacks import data_poisoning as _data_poisoning  # noqa: F401,E402
from simulations.attacks import model_poisoning as _model_poisoning  # noqa: F401,E402
from simulations.attacks import omniscient as _omniscient  # noqa: F401,E402
from simulations.attacks import optimization as _optimization  # noqa: F401,E402
from simulations.attacks import adaptive as _adaptive  # noqa: F401,E402
from simulations.attacks import model_replacement as _model_replacement  # noqa: F401,E402
from simulations.attacks import dba as _dba  # noqa: F401,E402
from simulations.attacks import neurotoxin as _neurotoxin  # noqa: F401,E402
from simulations.attacks import norm_bounded as _norm_bounded  # noqa: F401,E402
from simulations.attacks import fang as _fang  # noqa: F401,E402

__all__ = ["Attack", "available", "build", "malicious_partitions", "parameters", "parse_params", "register"]
