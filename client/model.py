"""The model trained by the clients and evaluated by the server."""

from __future__ import annotations

import torch
from torch import nn


def build_model(num_features: int, num_classes: int, hidden: int = 64) -> nn.Module:
    """A small multi-layer perceptron, enough for 8x8 digits (~4.8k parameters).

    Parameters
    ----------
    num_features : int
        Input width.
    num_classes : int
        Output width.
    hidden : int
        Width of the hidden layer.
    """
    return nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def training_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
