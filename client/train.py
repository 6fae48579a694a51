"""Local training and evaluation loops."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
) -> float:
    """Train ``model`` in place with plain SGD and return the mean training loss.

    Parameters
    ----------
    model : nn.Module
        Model to train; moved to ``device``.
    x, y : np.ndarray
        Features (N, F) and labels (N,).
    epochs : int
        Passes over the data.
    lr : float
        SGD learning rate.
    batch_size : int
        Mini-batch size.
    device : torch.device
        Where to train.
    generator : torch.Generator
        CPU generator for the shuffling order (the run's seed makes training reproducible).
    """
    if len(y) == 0:
        raise ValueError("cannot train on an empty dataset")
    model.to(device).train()
    features = torch.as_tensor(x, device=device)
    labels = torch.as_tensor(y, device=device)
    optimiser = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(device)
        for start in range(0, len(labels), batch_size):
            batch = order[start : start + batch_size]
            optimiser.zero_grad()
            loss = loss_fn(model(features[batch]), labels[batch])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
            count += len(batch)
    return total / count


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[float, float]:
    """Return (mean cross-entropy loss, accuracy) of ``model`` on (x, y)."""
    model.to(device).eval()
    logits = model(torch.as_tensor(x, device=device))
    labels = torch.as_tensor(y, device=device)
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(dim=1) == labels).double().mean().item()
    return loss, accuracy
