"""The pixel-pattern trigger of backdoor attacks: a small square patch in the image's corner.

On images (``image_shape = (C, H, W)``, or ``(H, W)`` for one channel) the trigger is the
``size x size`` patch in the bottom-right corner of the ``H x W`` plane, in every channel, each
pixel set to ``value`` (the top of the [0, 1] pixel range by default), as in the pixel-pattern
backdoors of Gu et al. (BadNets, 2017) and Bagdasaryan et al. (2020). Samples may be stored as
``(C, H, W)`` or flat (channel-major, ``C * H * W`` features); both address the same pixels, so
an 8x8 digit stored as 64 features gets exactly the pixels it would get as a (1, 8, 8) image.
Datasets without an image shape get the same number of features, ``size * size``, at the end of
the (flattened) sample.

A trigger can also be one *local pattern* of a split global trigger (DBA, Xie et al. 2020):
:meth:`Trigger.split` cuts the patch's pixels, in row-major order, into ``parts`` contiguous runs
(one row-bar each when ``parts`` equals ``size``), and ``Trigger(part=k, parts=p)`` stamps run
``k`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from simulations.attacks.base import ImageShape, image_layout


@dataclass(frozen=True)
class Trigger:
    """A corner-patch trigger, or one local part of it.

    Attributes
    ----------
    size : int
        Side of the square patch in pixels.
    value : float
        Value every trigger pixel is set to.
    part : int or None
        Index of the local pattern this trigger stamps (``0 <= part < parts``); None: the whole
        patch.
    parts : int
        Number of local patterns the patch is split into (1: not split).
    """

    size: int = 3
    value: float = 1.0
    part: int | None = None
    parts: int = 1

    def __post_init__(self) -> None:
        if self.parts < 1 or self.parts > self.size * self.size:
            raise ValueError(f"trigger: parts must lie in [1, size*size={self.size * self.size}], got {self.parts}")
        if self.part is not None and not 0 <= self.part < self.parts:
            raise ValueError(f"trigger: part must lie in [0, parts={self.parts}), got {self.part}")

    @property
    def full(self) -> Trigger:
        """The whole patch this trigger is (a part of)."""
        return replace(self, part=None, parts=1)

    def split(self, parts: int) -> list[Trigger]:
        """The ``parts`` disjoint local patterns whose union is this (whole) patch."""
        return [replace(self, part=k, parts=parts) for k in range(parts)]

    def _patch_positions(self) -> np.ndarray:
        """Positions ``0 .. size*size - 1`` (row-major in the patch) that this trigger stamps."""
        positions = np.arange(self.size * self.size)
        if self.part is None:
            return positions
        return np.array_split(positions, self.parts)[self.part]

    def feature_indices(self, sample_shape: int | tuple[int, ...], image_shape: ImageShape, *,
                        attack: str = "trigger") -> np.ndarray:
        """Indices into the flattened sample (``x.reshape(N, -1)``) that the trigger overwrites.

        Parameters
        ----------
        sample_shape : int or tuple of int
            ``x.shape[1:]`` (an int is read as a flat sample of that many features).
        image_shape : tuple or None
            ``(C, H, W)``, ``(H, W)`` or None.
        attack : str
            Name used in error messages.

        Raises
        ------
        ValueError
            If the patch does not fit the image (or the sample), or ``image_shape`` does not
            match the samples.
        """
        sample = (int(sample_shape),) if isinstance(sample_shape, (int, np.integer)) else tuple(sample_shape)
        num_features = math.prod(sample)
        layout = image_layout(attack, sample, image_shape)
        if layout is None:
            count = self.size * self.size
            if count > num_features:
                raise ValueError(f"{attack}: a {self.size}x{self.size} trigger needs {count} features, the data has {num_features}")
            return (num_features - count + self._patch_positions()).astype(np.int64)
        channels, height, width = layout
        if self.size > min(height, width):
            raise ValueError(f"{attack}: a {self.size}x{self.size} trigger does not fit a {height}x{width} image")
        positions = self._patch_positions()
        rows = height - self.size + positions // self.size
        cols = width - self.size + positions % self.size
        plane = rows * width + cols                                   # pixel index within one channel
        return (np.arange(channels)[:, None] * (height * width) + plane[None, :]).ravel().astype(np.int64)

    def stamp(self, x: np.ndarray, rows: np.ndarray, image_shape: ImageShape, *, attack: str = "trigger") -> np.ndarray:
        """Return a copy of ``x`` (same shape and dtype) with the trigger on ``rows`` (other rows unchanged)."""
        out = np.array(x, copy=True)
        columns = self.feature_indices(out.shape[1:], image_shape, attack=attack)
        flat = out.reshape(len(out), -1)  # a view of the fresh contiguous copy: writes land in ``out``
        flat[np.ix_(np.asarray(rows, dtype=np.int64), columns)] = self.value
        return out

    def present(self, x: np.ndarray, image_shape: ImageShape) -> np.ndarray:
        """Boolean (N,): rows whose trigger pixels all equal ``value``."""
        columns = self.feature_indices(x.shape[1:], image_shape)
        flat = np.asarray(x).reshape(len(x), -1)
        return np.all(flat[:, columns] == np.asarray(self.value, dtype=flat.dtype), axis=1)
