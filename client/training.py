"""Phalanx's default ``train`` and ``evaluate`` for tasks that bring none, and the device choice.

:func:`default_train` is plain mini-batch SGD on cross-entropy, reading ``local-epochs``, ``lr``
and ``batch-size`` from the run config, with optional mixed precision (``amp``). The partition
is moved to the device once and batches are indexed there, so the data stays on the GPU
between steps. Shuffling draws from torch's global generator, which the ClientApp seeds from
``(seed, partition, round)`` before calling any task's ``train``: runs are reproducible, and a
user's own ``train`` gets the same seeding for free.

:func:`default_evaluate` returns the mean cross-entropy ``loss`` and the ``accuracy``, in batches
of :data:`EVAL_BATCH`, without building an autograd graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

#: Evaluation batch size (large: no gradients are kept).
EVAL_BATCH = 1024
#: Defaults used when the run config does not say (a user's own app may pass a bare config).
DEFAULT_EPOCHS = 1
DEFAULT_LR = 0.01
DEFAULT_BATCH = 32


def training_device(node_config: Mapping[str, Any] | None = None) -> torch.device:
    """Where this client trains: the node config's ``device`` (deployment), else CUDA when present, else CPU.

    A SuperNode started with ``--node-config "device='cuda:1'"`` trains on that GPU; in
    simulation each client actor sees the GPU share Ray gave it as ``cuda``.
    """
    requested = str((node_config or {}).get("device", "") or "")
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"node config asks for device {requested!r}, but CUDA is not available here")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensors_of(dataset: Dataset, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of ``dataset`` as two tensors (x, y) on ``device``.

    Array-backed datasets (Phalanx's ``ArrayDataset``, torch's ``TensorDataset``) are converted
    without a pass over the samples; any other map-style dataset of ``(x, y)`` pairs is read
    once with a DataLoader.
    """
    x = getattr(dataset, "x", None)
    y = getattr(dataset, "y", None)
    if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
        return torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        features, labels = dataset.tensors
        return features.to(device), labels.to(device)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    loader = DataLoader(dataset, batch_size=1024, shuffle=False)
    xs, ys = zip(*[(bx, by) for bx, by in loader])
    return torch.cat(xs).to(device), torch.cat(ys).to(device)


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    # float16 needs loss scaling and is a CUDA format; bfloat16 is the CPU's mixed precision.
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def default_train(model: nn.Module, dataset: Dataset, run_config: Mapping[str, Any], device: torch.device) -> dict:
    """Train ``model`` in place with mini-batch SGD on cross-entropy; return ``{"train-loss": mean loss}``.

    Parameters
    ----------
    model : nn.Module
        Model to train; moved to ``device``.
    dataset : Dataset
        The client's partition, ``(x, y)`` samples.
    run_config : Mapping
        ``local-epochs``, ``lr``, ``batch-size`` and ``amp`` (mixed precision: bfloat16 autocast on
        CPU, float16 with loss scaling on CUDA) are read from it.
    device : torch.device
        Where to train.

    Notes
    -----
    With BatchNorm layers a final batch of a single sample is skipped (BatchNorm cannot
    normalise one value in training mode).
    """
    epochs = int(run_config.get("local-epochs", DEFAULT_EPOCHS))
    lr = float(run_config.get("lr", DEFAULT_LR))
    batch_size = int(run_config.get("batch-size", DEFAULT_BATCH))
    amp = bool(run_config.get("amp", False))
    features, labels = tensors_of(dataset, device)
    if len(labels) == 0:
        raise ValueError("cannot train on an empty dataset")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # float16 on CUDA needs loss scaling, which needs a torch optimizer; otherwise plain SGD is
    # applied directly: the same update as torch.optim.SGD(lr) (param -= lr * grad), without the
    # optimizer's per-step bookkeeping, which costs more than a small model's step.
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
    optimiser = torch.optim.SGD(params, lr=lr) if scaler is not None else None
    skip_single = _has_batch_norm(model)
    loss_fn = nn.CrossEntropyLoss()
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(labels)).to(device)
        for start in range(0, len(labels), batch_size):
            batch = order[start : start + batch_size]
            if skip_single and len(batch) == 1:
                continue
            for p in params:
                p.grad = None
            with _autocast(device, amp):
                loss = loss_fn(model(features[batch]), labels[batch])
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
            else:
                loss.backward()
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.add_(p.grad, alpha=-lr)
            total += loss.item() * len(batch)
            count += len(batch)
    if count == 0:
        raise ValueError("no batch to train on (a single sample with a BatchNorm model)")
    return {"train-loss": total / count}


@torch.no_grad()
def default_evaluate(model: nn.Module, dataset: Dataset, device: torch.device) -> dict:
    """Return ``{"loss": mean cross-entropy, "accuracy": share correct}`` of ``model`` on ``dataset``."""
    features, labels = tensors_of(dataset, device)
    if len(labels) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    model.to(device).eval()
    losses, sizes, correct = [], [], 0
    for start in range(0, len(labels), EVAL_BATCH):
        logits = model(features[start : start + EVAL_BATCH])
        batch_labels = labels[start : start + EVAL_BATCH]
        losses.append(nn.functional.cross_entropy(logits.float(), batch_labels).item())
        sizes.append(len(batch_labels))
        correct += int((logits.argmax(dim=1) == batch_labels).sum())
    # One batch (the common case) is cross_entropy's own mean, unrounded by re-weighting.
    mean_loss = losses[0] if len(losses) == 1 else float(np.dot(losses, sizes) / len(labels))
    return {"loss": mean_loss, "accuracy": correct / len(labels)}
