"""The pixel-pattern trigger of backdoor attacks: a small square patch in the image's corner.

On images (``image_shape = (H, W)``) the trigger is the ``size x size`` patch in the bottom-right
corner, every pixel set to ``value`` (the top of the [0, 1] pixel range by default), as in the
pixel-pattern backdoors of Gu et al. (BadNets, 2017) and Bagdasaryan et al. (2020). Datasets
without an image shape get the same number of features, ``size * size``, at the end of the
feature vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Trigger:
    """A corner-patch trigger.

    Attributes
    ----------
    size : int
        Side of the square patch in pixels.
    value : float
        Value every trigger pixel is set to.
    """

    size: int = 3
    value: float = 1.0

    def feature_indices(self, num_features: int, image_shape: tuple[int, int] | None, *, attack: str = "trigger") -> np.ndarray:
        """Flat feature indices the trigger overwrites.

        Raises
        ------
        ValueError
            If the patch does not fit the image (or feature vector), or ``image_shape`` does not
            match ``num_features``.
        """
        if image_shape is None:
            count = self.size * self.size
            if count > num_features:
                raise ValueError(f"{attack}: a {self.size}x{self.size} trigger needs {count} features, the data has {num_features}")
            return np.arange(num_features - count, num_features)
        height, width = (int(s) for s in image_shape)
        if height * width != num_features:
            raise ValueError(f"{attack}: image_shape {tuple(image_shape)} does not match {num_features} features")
        if self.size > min(height, width):
            raise ValueError(f"{attack}: a {self.size}x{self.size} trigger does not fit a {height}x{width} image")
        rows = np.arange(height - self.size, height)
        cols = np.arange(width - self.size, width)
        return (rows[:, None] * width + cols[None, :]).ravel()

    def stamp(self, x: np.ndarray, rows: np.ndarray, image_shape: tuple[int, int] | None, *, attack: str = "trigger") -> np.ndarray:
        """Return a copy of ``x`` with the trigger on ``rows`` (all other rows unchanged)."""
        out = np.array(x, dtype=np.float32, copy=True)
        columns = self.feature_indices(x.shape[1], image_shape, attack=attack)
        out[np.ix_(np.asarray(rows, dtype=np.int64), columns)] = self.value
        return out

    def present(self, x: np.ndarray, image_shape: tuple[int, int] | None) -> np.ndarray:
        """Boolean (N,): rows whose trigger pixels all equal ``value``."""
        columns = self.feature_indices(x.shape[1], image_shape)
        return np.all(x[:, columns] == np.float32(self.value), axis=1)
