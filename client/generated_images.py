"""A generated, offline image-classification dataset shaped like CIFAR-10 (3 x 32 x 32, 10 classes).

Nothing can be downloaded on the machines Phalanx is tested on, so the image tasks
(``images-cnn``, ``resnet18``) train on this instead of CIFAR-10 itself. Each class is a colour
grating: a sinusoidal stripe pattern with its own orientation (classes 18 degrees apart),
stripe frequency (two values alternate) and colour. Each sample jitters all three (orientation
by a normal of 0.18 rad, frequency by +-15%, every colour channel by +-50%), draws a random
phase, a random background colour and contrast, and adds pixel noise of std 0.15; pixels are
clipped to [0, 1]. Neighbouring classes overlap, so the problem is learnable but not trivial:
a small CNN trained centrally reaches about 0.3 accuracy after one epoch and about 0.9 after
five or six (measured on the project's 2-core CPU with SGD, lr 0.05, batch 16).

The generator is fixed (seed 2024): the data is part of the problem, not of a run's randomness.
"""

from __future__ import annotations

import numpy as np

#: Samples generated (the server's test split takes 20% of them).
NUM_SAMPLES = 3000
#: Classes, channels and image side, as in CIFAR-10.
NUM_CLASSES = 10
CHANNELS = 3
SIZE = 32
#: Seed of the generator.
SEED = 2024


def generate_images(num_samples: int = NUM_SAMPLES, *, seed: int = SEED, size: int = SIZE,
                    num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """The generated images and their labels.

    Parameters
    ----------
    num_samples : int
        Number of images.
    seed : int
        Generator seed (the default gives the built-in ``images`` dataset).
    size : int
        Image side in pixels.
    num_classes : int
        Number of classes.

    Returns
    -------
    x : np.ndarray
        (num_samples, 3, size, size) float32 in [0, 1].
    y : np.ndarray
        (num_samples,) int64 labels in [0, num_classes).
    """
    if num_samples < 1 or size < 4 or num_classes < 2:
        raise ValueError(f"generate_images: need num_samples >= 1, size >= 4, num_classes >= 2, "
                         f"got {num_samples}, {size}, {num_classes}")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=num_samples)
    classes = np.arange(num_classes)
    orientation = np.pi * classes / num_classes
    frequency = np.where(classes % 2 == 0, 2.5, 4.0)
    colour = rng.uniform(0.2, 1.0, size=(num_classes, CHANNELS))

    rows, cols = np.mgrid[0:size, 0:size] / size
    theta = orientation[y] + rng.normal(0.0, 0.18, num_samples)
    freq = frequency[y] * rng.uniform(0.85, 1.15, num_samples)
    phase = rng.uniform(0.0, 2 * np.pi, num_samples)
    along = np.cos(theta)[:, None, None] * cols + np.sin(theta)[:, None, None] * rows
    grating = 0.5 + 0.5 * np.sin(2 * np.pi * freq[:, None, None] * along + phase[:, None, None])
    tint = colour[y] * rng.uniform(0.5, 1.5, (num_samples, CHANNELS))
    background = rng.uniform(0.0, 0.5, (num_samples, CHANNELS))
    contrast = rng.uniform(0.25, 0.6, num_samples)[:, None, None, None]
    images = background[:, :, None, None] * (1 - contrast) + contrast * tint[:, :, None, None] * grating[:, None]
    images = images + rng.normal(0.0, 0.15, images.shape)
    return np.clip(images, 0.0, 1.0).astype(np.float32), y.astype(np.int64)
