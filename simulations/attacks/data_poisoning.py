"""Data poisoning: attacks that tamper with training data before a client trains.

Every attack here implements ``poison_data_indexed``, which also returns the indices of the rows
it changed (sorted), so that experiments and tests can tell poisoned rows from clean ones;
``poison_data`` (the hook the ClientApp calls) drops the indices. Inputs are never modified in
place, and outputs keep their shapes and dtypes. Samples are ``(N, *sample_shape)``; on images
(``image_shape`` given) the trigger sits in image coordinates (see
:mod:`simulations.attacks.triggers`), whether the samples are stored as ``(C, H, W)`` or flat.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from simulations.attacks.base import (
    Attack,
    Context,
    ImageShape,
    as_choice,
    as_float,
    as_fraction,
    as_int,
    check_class,
    check_dataset,
)
from simulations.attacks.registry import register
from simulations.attacks.triggers import Trigger

class DataPoisoningAttack(Attack):
    """An attack whose effect is a transformation of local training data."""

    def poison_data_indexed(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        num_classes: int,
        image_shape: ImageShape,
        rng: np.random.Generator,
        context: Context = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`poison_data`, and also return the sorted int64 indices of the rows changed."""
        raise NotImplementedError

    def poison_data(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        num_classes: int,
        image_shape: ImageShape,
        rng: np.random.Generator,
        context: Context = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Poisoned copies of ``(x, y)``; see :meth:`poison_data_indexed`."""
        x_out, y_out, _ = self.poison_data_indexed(x, y, num_classes=num_classes, image_shape=image_shape, rng=rng,
                                                   context=context)
        return x_out, y_out


def _sample_rows(num_rows: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``round(fraction * num_rows)`` distinct row indices, sorted."""
    count = int(round(fraction * num_rows))
    return np.sort(rng.choice(num_rows, size=count, replace=False)).astype(np.int64)


def triggered_testset(
    trigger: Trigger, target: int, x: np.ndarray, y: np.ndarray, image_shape: ImageShape, attack: str
) -> tuple[np.ndarray, np.ndarray]:
    """Test rows of classes other than ``target``, trigger stamped, labelled ``target`` (labels keep y's dtype)."""
    y = np.asarray(y)
    keep = np.flatnonzero(y != target)
    x_kept = np.asarray(x)[keep]
    stamped = trigger.stamp(x_kept, np.arange(len(keep)), image_shape, attack=attack)
    return stamped, np.full(len(keep), target, dtype=y.dtype)


def stamp_and_relabel(
    trigger: Trigger, target: int, x: np.ndarray, y: np.ndarray, rows: np.ndarray, image_shape: ImageShape, attack: str
) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``(x, y)`` with the trigger on ``rows`` and those rows labelled ``target``."""
    y_out = np.array(y, copy=True)
    y_out[rows] = target
    return trigger.stamp(x, rows, image_shape, attack=attack), y_out


@register("label-flip")
class LabelFlip(DataPoisoningAttack):
    """Label flipping on every local row of a malicious client.

    Threat model: the attacker controls its own client, hence its local labels; it knows nothing
    of other clients or the aggregation rule. Tolpegin et al., "Data Poisoning Attacks Against
    Federated Learning Systems", ESORICS 2020; Fang et al., USENIX Security 2020 (the
    ``y -> C - 1 - y`` flip).

    Parameters
    ----------
    mode : {"permutation", "all-to-one"}
        ``"permutation"`` (default) maps ``y -> num_classes - 1 - y`` (a fixed reversal, the same at
        every attacker so that their gradients agree; with an odd class count the middle class maps
        to itself). ``"all-to-one"`` maps every label to ``target``.
    target : int, optional
        The class of ``"all-to-one"`` (default 0); not allowed with ``"permutation"``.
    """

    MODES = ("permutation", "all-to-one")

    def __init__(self, mode: str = "permutation", target: int | None = None) -> None:
        self.mode = as_choice(self.name, "mode", mode, self.MODES)
        if self.mode == "permutation" and target is not None:
            raise ValueError(f"{self.name}: target only applies to mode='all-to-one', got mode='permutation'")
        self.target = None if self.mode == "permutation" else as_int(self.name, "target", 0 if target is None else target, minimum=0)

    def flipped_labels(self, y: np.ndarray, num_classes: int) -> np.ndarray:
        """The label map applied to ``y`` (a copy of y's dtype)."""
        y = np.asarray(y)
        if self.mode == "permutation":
            return (num_classes - 1 - y).astype(y.dtype)
        return np.full(len(y), self.target, dtype=y.dtype)

    def poison_data_indexed(self, x: np.ndarray, y: np.ndarray, *, num_classes: int, image_shape: ImageShape,
                            rng: np.random.Generator, context: Context = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        check_dataset(self.name, x, y, num_classes, image_shape)
        if self.target is not None:
            check_class(self.name, "target", self.target, num_classes)
        y_out = self.flipped_labels(y, num_classes)
        changed = np.flatnonzero(y_out != y).astype(np.int64)
        return np.array(x, copy=True), y_out, changed


@register("targeted-label-flip")
class TargetedLabelFlip(DataPoisoningAttack):
    """Relabel every local example of class ``source`` as ``target``; other rows are untouched.

    Threat model: the attacker controls its own client's labels and wants one class misclassified
    as another while overall accuracy stays high (Tolpegin et al., ESORICS 2020).

    Parameters
    ----------
    source : int
        Class whose examples are relabelled (default 7, which resembles a 1 in digit datasets).
    target : int
        Their new label (default 1); must differ from ``source``.
    """

    def __init__(self, source: int = 7, target: int = 1) -> None:
        self.source = as_int(self.name, "source", source, minimum=0)
        self.target = as_int(self.name, "target", target, minimum=0)
        if self.source == self.target:
            raise ValueError(f"{self.name}: source and target must differ, both are {self.source}")

    def poison_data_indexed(self, x: np.ndarray, y: np.ndarray, *, num_classes: int, image_shape: ImageShape,
                            rng: np.random.Generator, context: Context = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        check_dataset(self.name, x, y, num_classes, image_shape)
        check_class(self.name, "source", self.source, num_classes)
        check_class(self.name, "target", self.target, num_classes)
        changed = np.flatnonzero(np.asarray(y) == self.source).astype(np.int64)
        y_out = np.array(y, copy=True)
        y_out[changed] = self.target
        return np.array(x, copy=True), y_out, changed


@register("backdoor")
class Backdoor(DataPoisoningAttack):
    """Pixel-pattern backdoor, optionally with model replacement (boosted update).

    A malicious client stamps a corner-patch trigger (:class:`~simulations.attacks.triggers.Trigger`)
    on exactly ``round(fraction * N)`` of its local rows, drawn at random, and relabels them
    ``target``; it trains on this mix so the model keeps its main-task accuracy but maps any
    triggered input to ``target``. With ``boost > 1`` it also multiplies its update by ``boost``
    (Bagdasaryan et al.'s model replacement, whose scale is ``n / eta`` for n clients and server
    learning rate eta) so that averaging does not dilute it.

    Threat model: the attacker controls its own client's data and update; it knows neither the
    other clients' data nor their updates. Bagdasaryan et al., "How To Backdoor Federated
    Learning", AISTATS 2020; the trigger follows Gu et al., "BadNets", 2017.

    Parameters
    ----------
    target : int
        Label of triggered inputs (default 0).
    fraction : float
        Share of local rows poisoned, in [0, 1] (default 0.3, about Bagdasaryan et al.'s 20 of 64
        per batch).
    size : int
        Side of the square trigger patch (default 3, e.g. 3x3 in an 8x8 digit).
    value : float
        Trigger pixel value (default 1.0, the top of the [0, 1] pixel range).
    boost : float
        Factor applied to the update (default 1.0: no model replacement).
    """

    def __init__(self, target: int = 0, fraction: float = 0.3, size: int = 3, value: float = 1.0, boost: float = 1.0) -> None:
        self.target = as_int(self.name, "target", target, minimum=0)
        self.fraction = as_fraction(self.name, "fraction", fraction)
        self.trigger = Trigger(as_int(self.name, "size", size, minimum=1), as_float(self.name, "value", value))
        self.boost = as_float(self.name, "boost", boost, positive=True)

    def poison_data_indexed(self, x: np.ndarray, y: np.ndarray, *, num_classes: int, image_shape: ImageShape,
                            rng: np.random.Generator, context: Context = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        check_dataset(self.name, x, y, num_classes, image_shape)
        check_class(self.name, "target", self.target, num_classes)
        rows = _sample_rows(len(y), self.fraction, rng)
        x_out, y_out = stamp_and_relabel(self.trigger_for(context), self.target, x, y, rows, image_shape, self.name)
        return x_out, y_out, rows

    def trigger_for(self, context: Context) -> Trigger:
        """The trigger this client stamps on its training rows (the whole one; DBA stamps a part)."""
        return self.trigger

    def poison_update(self, update: torch.Tensor, *, rng: torch.Generator | None = None,
                      context: Context = None) -> torch.Tensor:
        """Model replacement: ``boost * update`` (the identity for ``boost = 1``)."""
        return update if self.boost == 1.0 else update * self.boost

    def triggered_testset(self, x: np.ndarray, y: np.ndarray, *,
                          image_shape: ImageShape) -> tuple[np.ndarray, np.ndarray] | None:
        """Test rows whose class is not ``target``, with the trigger, labelled ``target``."""
        return triggered_testset(self.trigger, self.target, x, y, image_shape, self.name)


@register("corrupted-source")
class CorruptedSource(DataPoisoningAttack):
    """A tampered data source at honest clients: a share of their local data is corrupted.

    Unlike the other attacks, no client is malicious: the honest clients' own data pipeline
    (a compromised dataset mirror, a faulty labelling service) delivers corrupted rows, and the
    clients train on them in good faith (``targets_honest = True``: the ClientApp applies this
    attack's ``poison_data`` at the honest clients). Exactly ``round(fraction * N)`` random rows
    are corrupted; ``poison_data_indexed`` (alias ``corrupt``) returns their indices.

    Threat model: the adversary controls the data source, not any client: it cannot see or
    change updates and knows nothing of the rule; every client is honest, so robust aggregation
    sees no outliers to reject. This is the supply-chain poisoning of Carlini et al., "Poisoning
    Web-Scale Training Datasets is Practical", IEEE S&P 2024.

    Parameters
    ----------
    fraction : float
        Share of each honest client's rows corrupted (default 0.2).
    mode : {"flip", "trigger"}
        ``"flip"`` (default): each corrupted row gets a uniformly random *different* label.
        ``"trigger"``: the backdoor trigger is stamped on the row and it is relabelled ``target``
        (a backdoor planted through the source); ``triggered_testset`` then measures it.
    target : int
        Label of triggered rows in ``"trigger"`` mode (default 0).
    size, value
        The trigger patch, as for ``backdoor``.
    """

    targets_honest = True
    MODES = ("flip", "trigger")

    def __init__(self, fraction: float = 0.2, mode: str = "flip", target: int = 0, size: int = 3, value: float = 1.0) -> None:
        self.fraction = as_fraction(self.name, "fraction", fraction)
        self.mode = as_choice(self.name, "mode", mode, self.MODES)
        self.target = as_int(self.name, "target", target, minimum=0)
        self.trigger = Trigger(as_int(self.name, "size", size, minimum=1), as_float(self.name, "value", value))

    def poison_data_indexed(self, x: np.ndarray, y: np.ndarray, *, num_classes: int, image_shape: ImageShape,
                            rng: np.random.Generator, context: Context = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        check_dataset(self.name, x, y, num_classes, image_shape)
        rows = _sample_rows(len(y), self.fraction, rng)
        if self.mode == "flip":
            y_out = np.array(y, copy=True)
            # A shift in [1, C-1] guarantees that every corrupted label differs from the true one.
            y_out[rows] = (y_out[rows] + rng.integers(1, num_classes, size=len(rows))) % num_classes
            return np.array(x, copy=True), y_out, rows
        check_class(self.name, "target", self.target, num_classes)
        x_out, y_out = stamp_and_relabel(self.trigger, self.target, x, y, rows, image_shape, self.name)
        return x_out, y_out, rows

    def corrupt(self, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Same as :meth:`poison_data_indexed`: corrupted copies and the corrupted row indices."""
        return self.poison_data_indexed(x, y, **kwargs)

    def triggered_testset(self, x: np.ndarray, y: np.ndarray, *,
                          image_shape: ImageShape) -> tuple[np.ndarray, np.ndarray] | None:
        """In ``"trigger"`` mode, the triggered test set (as for ``backdoor``); else None."""
        if self.mode != "trigger":
            return None
        return triggered_testset(self.trigger, self.target, x, y, image_shape, self.name)
