"""Phalanx robust aggregation library: pure torch, no Flower.

>>> import aggregators, torch
>>> rule = aggregators.build("krum", num_byzantine=1)
>>> out = rule(torch.randn(6, 10))
>>> out.vector.shape, out.scores.shape, out.selected.shape
(torch.Size([10]), torch.Size([6]), torch.Size([6]))

Rules are callables ``rule(updates, weights=None) -> AggregationResult`` over an ``(n, d)``
stack. Optional capabilities a server can probe with ``getattr``: ``sensitivity(clip_norm, n)``,
``state_dict()`` / ``load_state_dict(d)``, ``needs_trusted_update`` with
``set_trusted_update(vector)``, ``uses_weights`` (whether ``weights`` changes the output), and
``uses_client_ids`` (the rule takes ``client_ids=``, one int per row, and keys its state by them).

Rules: mean, median, trimmed-mean, meamed, krum, multi-krum, bulyan, geometric-median,
centered-clipping, dnc, signsgd-majority, fltrust, flame, foolsgold. Pre-aggregation steps: clip,
arc, nnm, bucketing, flame, foolsgold (``build(name, pre=[...])``).
"""

from aggregators.base import AggregationResult
from aggregators.registry import available, available_pre, build, register, register_pre, unregister

# Importing the rule modules registers their rules.
from aggregators import coordinatewise as _coordinatewise  # noqa: F401
from aggregators import krum as _krum  # noqa: F401
from aggregators import geometric as _geometric  # noqa: F401
from aggregators import dnc as _dnc  # noqa: F401
from aggregators import fltrust as _fltrust  # noqa: F401
from aggregators import sign_majority as _sign_majority  # noqa: F401
from aggregators import flame as _flame  # noqa: F401
from aggregators import foolsgold as _foolsgold  # noqa: F401
from aggregators import pre as _pre  # noqa: F401

__all__ = ["AggregationResult", "available", "available_pre", "build", "register", "register_pre", "unregister"]
