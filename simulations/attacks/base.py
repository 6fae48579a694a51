"""The :class:`Attack` interface every simulated attack implements, and shared input checks.

An attack is a small object built by name (``simulations.attacks.build``). Phalanx's client and
server know no particular attack; they only call the hooks below when a run's config names one:

* ``poison_data`` runs in a malicious ClientApp on its local training set before training;
* ``poison_update`` runs in a malicious ClientApp on its flat update (trained - global);
* ``craft`` runs on the server's simulation interceptor for omniscient attacks, which see the
  honest updates of the round (possible only in simulation);
* ``triggered_testset`` gives the server a test set on which a backdoor's success is measured.

The client hooks also receive ``context``, a :class:`client.hooks.AttackContext` (the round, this
attacker's position among the attackers, the global model it received and the previous one, the
run config); it is None when the caller has none, and every attack then behaves as documented
for that case.

Data layout of ``poison_data`` and ``triggered_testset``: ``x`` is ``(N, *sample_shape)``,
``y`` is ``(N,)``; ``image_shape`` is ``(C, H, W)`` (or ``(H, W)``, read as ``(1, H, W)``) when
every sample is an image, stored either as ``(C, H, W)`` or flat with ``C * H * W`` features
(channel-major, as ``x.reshape(N, C, H, W)`` reads it), else None. Outputs keep the input's
shape and dtype.

Every hook defaults to "do nothing", so an attack overrides only the ones its threat model uses.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Optional, Sequence, Tuple

import numpy as np
import torch

#: What an adaptive attack calls: ``rule(updates) -> result`` with ``result.vector`` of shape (d,).
Aggregator = Callable[[torch.Tensor], Any]

#: ``(C, H, W)`` (or the legacy ``(H, W)``) of image data, None for plain feature vectors.
ImageShape = Optional[Tuple[int, ...]]

#: The client's :class:`client.hooks.AttackContext` (typed loosely: simulations/ does not need
#: client/ to define an attack, and an attack reads only the fields it documents).
Context = Any


class Attack:
    """Base class of all simulated attacks: every hook is the identity (or absent) by default.

    Attributes
    ----------
    name : str
        Registry name, set by :func:`simulations.attacks.register`.
    omniscient : bool
        True for attacks that craft their updates on the server from the honest ones
        (a simulation-only hook: a deployed server never calls ``craft``).
    targets_honest : bool
        True for threats that tamper with honest clients' data (the attack's ``poison_data`` is
        applied by the honest clients, and no client is an attacker).
    """

    name: ClassVar[str] = "attack"
    omniscient: ClassVar[bool] = False
    targets_honest: ClassVar[bool] = False

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
        """Transform a client's local training set (default: unchanged).

        Parameters
        ----------
        x : np.ndarray
            Samples, ``(N, *sample_shape)`` float (pixels in the task's range, usually [0, 1]).
        y : np.ndarray
            Labels, (N,) int64 in ``[0, num_classes)``.
        num_classes : int
            Number of classes of the dataset.
        image_shape : tuple or None
            ``(C, H, W)`` (or ``(H, W)``) when every sample is an image, else None; see the
            module docstring for the layouts accepted.
        rng : np.random.Generator
            The client's generator for this round.
        context : client.hooks.AttackContext, optional
            This round's attack context (None: the attack acts without it).

        Returns
        -------
        tuple[np.ndarray, np.ndarray]
            The (possibly poisoned) samples and labels, of the inputs' shapes and dtypes; the
            inputs are never modified in place.
        """
        return x, y

    def poison_update(self, update: torch.Tensor, *, rng: torch.Generator, context: Context = None) -> torch.Tensor:
        """Transform a malicious client's flat update ``trained - global`` of shape (d,) (default: unchanged).

        ``update`` has the layout of ``context.global_vector`` (the model's floating-point
        state entries, in order); ``context`` is None when the caller has none.
        """
        return update

    def craft(
        self,
        honest: torch.Tensor,
        num_malicious: int,
        *,
        aggregator: Aggregator | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Craft the malicious updates from the honest ones (omniscient attacks only).

        Parameters
        ----------
        honest : torch.Tensor
            The honest updates of the round, (h, d).
        num_malicious : int
            How many malicious rows to return.
        aggregator : callable, optional
            The server's rule, ``rule(updates) -> result`` with ``result.vector``; adaptive
            attacks query it.
        generator : torch.Generator, optional
            Randomness for attacks that need it.

        Returns
        -------
        torch.Tensor
            (num_malicious, d), same device and dtype as ``honest``.
        """
        raise NotImplementedError(f"attack {self.name!r} is not omniscient: it has no craft()")

    def triggered_testset(
        self, x: np.ndarray, y: np.ndarray, *, image_shape: ImageShape
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Test inputs carrying a backdoor trigger, labelled with its target (None: no backdoor)."""
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and not k.startswith("last_"))
        return f"{type(self).__name__}({params})"


# --- shared checks: every message names the attack and the offending value -----------------------


def check_craft_inputs(attack: str, honest: torch.Tensor, num_malicious: int) -> None:
    """Reject an honest stack or malicious count that ``craft`` cannot use.

    Raises
    ------
    ValueError
        If ``honest`` is not a finite 2-D floating tensor with at least one row, or
        ``num_malicious`` is not a positive int.
    """
    if not isinstance(honest, torch.Tensor):
        raise ValueError(f"{attack}: honest updates must be a torch.Tensor, got {type(honest).__name__}")
    if honest.dim() != 2 or honest.shape[0] < 1 or honest.shape[1] < 1:
        raise ValueError(f"{attack}: honest updates must be a non-empty (h, d) stack, got shape {tuple(honest.shape)}")
    if not honest.is_floating_point():
        raise ValueError(f"{attack}: honest updates must be floating point, got {honest.dtype}")
    if not bool(torch.isfinite(honest).all()):
        bad = torch.nonzero(~torch.isfinite(honest).all(dim=1)).flatten().tolist()
        raise ValueError(f"{attack}: honest rows {bad} contain NaN or Inf")
    if isinstance(num_malicious, bool) or not isinstance(num_malicious, (int, np.integer)) or num_malicious < 1:
        raise ValueError(f"{attack}: num_malicious must be a positive int, got {num_malicious!r}")


def image_layout(attack: str, sample_shape: Sequence[int], image_shape: ImageShape) -> tuple[int, int, int] | None:
    """``image_shape`` as ``(C, H, W)``, checked against the shape of one sample.

    Parameters
    ----------
    attack : str
        Name used in error messages.
    sample_shape : sequence of int
        ``x.shape[1:]``.
    image_shape : tuple or None
        ``(C, H, W)``, ``(H, W)`` (one channel) or None (not an image).

    Returns
    -------
    tuple[int, int, int] or None
        ``(C, H, W)``, or None when ``image_shape`` is None.

    Raises
    ------
    ValueError
        If ``image_shape`` is not 2 or 3 positive ints, or the samples are neither ``(C, H, W)``,
        nor flat with ``C * H * W`` features, nor ``(H, W)`` with one channel.
    """
    if image_shape is None:
        return None
    dims = tuple(image_shape)
    if len(dims) not in (2, 3) or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in dims):
        raise ValueError(f"{attack}: image_shape must be (C, H, W) or (H, W) of positive ints, got {image_shape!r}")
    channels, height, width = (int(s) for s in ((1, *dims) if len(dims) == 2 else dims))
    sample = tuple(int(s) for s in sample_shape)
    flat_match = len(sample) == 1 and sample[0] == channels * height * width
    # An (H, W, C) sample would have the right size but the wrong axes: it is refused, not guessed.
    if sample != (channels, height, width) and not flat_match and not (channels == 1 and sample == (height, width)):
        raise ValueError(f"{attack}: image_shape {tuple(image_shape)} does not match samples of shape {sample} "
                         f"(expected {(channels, height, width)} or {channels * height * width} flat features)")
    return channels, height, width


def check_dataset(
    attack: str, x: np.ndarray, y: np.ndarray, num_classes: int, image_shape: ImageShape = None
) -> tuple[int, int, int] | None:
    """Reject a local dataset that a data-poisoning attack cannot transform.

    Returns
    -------
    tuple[int, int, int] or None
        The image layout ``(C, H, W)`` (see :func:`image_layout`), None for non-image data.
    """
    if not isinstance(x, np.ndarray) or x.ndim < 2 or math.prod(x.shape[1:]) < 1:
        raise ValueError(f"{attack}: x must be an (N, *sample_shape) array, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{attack}: y must be an (N,) array matching x's {len(x)} rows, got {getattr(y, 'shape', None)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{attack}: y must hold integer class labels, got dtype {y.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"{attack}: num_classes must be an int >= 2, got {num_classes!r}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{attack}: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return image_layout(attack, x.shape[1:], image_shape)


def check_class(attack: str, param: str, value: int, num_classes: int) -> None:
    """Reject a class parameter (target, source) outside ``[0, num_classes)``."""
    if not 0 <= value < num_classes:
        raise ValueError(f"{attack}: {param}={value} is not a class of this dataset (0..{num_classes - 1})")


def as_float(attack: str, param: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a finite float, else ValueError naming the attack and the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{attack}: {param} must be a number, got {value!r}")
    number = float(value)
    if not np.isfinite(number):
        raise ValueError(f"{attack}: {param} must be finite, got {value!r}")
    if positive and number <= 0:
        raise ValueError(f"{attack}: {param} must be > 0, got {value!r}")
    if nonnegative and number < 0:
        raise ValueError(f"{attack}: {param} must be >= 0, got {value!r}")
    return number


def as_int(attack: str, param: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an int (a float with an integral value is accepted), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{attack}: {param} must be an integer, got {value!r}")
    if not np.isfinite(float(value)) or float(value) != int(value):
        raise ValueError(f"{attack}: {param} must be an integer, got {value!r}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ValueError(f"{attack}: {param} must be >= {minimum}, got {value!r}")
    return number


def as_fraction(attack: str, param: str, value: Any) -> float:
    """``value`` as a float in [0, 1], else ValueError."""
    number = as_float(attack, param, value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{attack}: {param} must lie in [0, 1], got {value!r}")
    return number


def as_choice(attack: str, param: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` as one of ``choices``, else ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{attack}: {param} must be one of {list(choices)}, got {value!r}")
    return str(value)


def as_bool(attack: str, param: str, value: Any) -> bool:
    """``value`` as a bool: a bool, 0 or 1, or ``"true"``/``"false"`` (as ``attack-params`` gives it)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{attack}: {param} must be true or false, got {value!r}")
