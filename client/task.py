"""The task interface: the user's model and data, in the shape of a Flower template's task.py.

A task is a module, or any object, with these functions (run-config ``task`` names it:
a built-in name such as ``digits-mlp``, or ``package.module`` / ``package.module:attr``)::

    def build_model(run_config) -> torch.nn.Module
    def load_partition(partition_id, num_partitions, run_config) -> torch.utils.data.Dataset  # (x, y) samples
    def load_test(run_config) -> torch.utils.data.Dataset      # the server's held-out split
    # optional; Phalanx's defaults (client.training) when absent:
    def train(model, dataset, run_config, device) -> dict      # metrics, including "train-loss"
    def evaluate(model, dataset, device) -> dict               # including "loss" and "accuracy"

``x`` may have any shape (an image is (C, H, W)); ``y`` is an integer class. What Phalanx needs to
know of the data it reads from optional attributes of the task, else infers:

``num_classes``
    Else the largest label of the held-out split + 1.
``image_shape``
    ``(C, H, W)``: the samples are images (backdoor triggers are placed, and the data audit's
    trigger screen runs, in image coordinates). Else inferred from a sample of shape (C, H, W)
    with C in 1..4, or (H, W); other shapes are not images.
``feature_range``
    ``(low, high)`` of every feature: the data audit's range check. Else none (the audit says
    that it cannot check ranges).
``defaults``
    A dict of run-config values the task recommends where the run config leaves them at "the
    task's default" (``lr = 0``), e.g. ``{"lr": 0.1}``.

:func:`load_task` resolves the name once per process; the result, a :class:`Task`, is what the
ServerApp, ClientApp, attacks, data audit, benchmarks and sweeps call.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from client.training import DEFAULT_LR, default_evaluate, default_train, tensors_of

#: Functions a task must provide.
REQUIRED = ("build_model", "load_partition", "load_test")
#: Functions a task may provide (Phalanx's defaults otherwise).
OPTIONAL = ("train", "evaluate")
#: Built-in task names -> "module:attribute".
BUILTIN_TASKS = {
    "digits-mlp": "client.tasks.builtin:DIGITS_MLP",
    "digits-cnn": "client.tasks.builtin:DIGITS_CNN",
    "images-cnn": "client.tasks.builtin:IMAGES_CNN",
    "resnet18": "client.tasks.builtin:RESNET18",
}


@dataclass(frozen=True)
class DataInfo:
    """What Phalanx knows of a task's samples.

    Attributes
    ----------
    num_classes : int
    sample_shape : tuple[int, ...]
        Shape of one ``x``.
    image_shape : tuple[int, int, int] | None
        ``(C, H, W)`` when the samples are images (``sample_shape`` itself, or flat of that size).
    feature_range : tuple[float, float] | None
    """

    num_classes: int
    sample_shape: tuple[int, ...]
    image_shape: tuple[int, int, int] | None
    feature_range: tuple[float, float] | None


class Task:
    """A task resolved from its source (a module or object), with Phalanx's defaults filled in.

    Parameters
    ----------
    source : module or object
        Provides ``build_model``, ``load_partition``, ``load_test`` and optionally ``train``,
        ``evaluate`` and the attributes described in the module docstring.
    name : str
        What the run config called it.
    """

    def __init__(self, source: Any, name: str) -> None:
        missing = [f for f in REQUIRED if not callable(getattr(source, f, None))]
        if missing:
            raise ValueError(f"task {name!r} ({_describe(source)}) lacks {missing}: a task provides "
                             f"{list(REQUIRED)} and optionally {list(OPTIONAL)}")
        self.source = source
        self.name = name
        self.has_own_train = callable(getattr(source, "train", None))
        self.has_own_evaluate = callable(getattr(source, "evaluate", None))
        defaults = getattr(source, "defaults", None) or {}
        if not isinstance(defaults, Mapping):
            raise ValueError(f"task {name!r}: 'defaults' must be a dict of run-config values, got {type(defaults).__name__}")
        self.defaults = dict(defaults)

    # -------------------------------------------------------------- the user's functions
    def build_model(self, run_config: Mapping[str, Any]) -> nn.Module:
        """The task's model, freshly initialised (seed torch first for reproducible weights)."""
        model = self.source.build_model(self.effective_config(run_config))
        if not isinstance(model, nn.Module):
            raise ValueError(f"task {self.name!r}: build_model returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    def load_partition(self, partition_id: int, num_partitions: int, run_config: Mapping[str, Any]) -> Dataset:
        """One client's training data."""
        data = self.source.load_partition(int(partition_id), int(num_partitions), self.effective_config(run_config))
        return self._check_dataset(data, "load_partition")

    def load_test(self, run_config: Mapping[str, Any]) -> Dataset:
        """The server's held-out split."""
        return self._check_dataset(self.source.load_test(self.effective_config(run_config)), "load_test")

    def train(self, model: nn.Module, dataset: Dataset, run_config: Mapping[str, Any], device: torch.device) -> dict:
        """Train in place; returns the metrics (Phalanx's SGD when the task has no ``train``)."""
        config = self.effective_config(run_config)
        fn = self.source.train if self.has_own_train else default_train
        metrics = fn(model, dataset, config, device)
        return self._check_metrics(metrics, "train")

    def evaluate(self, model: nn.Module, dataset: Dataset, device: torch.device) -> dict:
        """Evaluate; returns at least ``loss`` and ``accuracy`` for the built-in evaluation."""
        fn = self.source.evaluate if self.has_own_evaluate else default_evaluate
        return self._check_metrics(fn(model, dataset, device), "evaluate")

    # -------------------------------------------------------------- what Phalanx infers
    def effective_config(self, run_config: Mapping[str, Any]) -> dict[str, Any]:
        """The run config with the task's ``defaults`` where it asks for them (``lr = 0``)."""
        config = dict(run_config)
        if float(config.get("lr", 0) or 0) == 0:
            config["lr"] = float(self.defaults.get("lr", DEFAULT_LR))
        return config

    def data_info(self, dataset: Dataset) -> DataInfo:
        """Classes, sample shape, image shape and feature range of ``dataset`` (see the module docstring)."""
        x, y = _first_arrays(dataset)
        sample_shape = tuple(int(s) for s in x.shape[1:])
        num_classes = getattr(self.source, "num_classes", None) or getattr(dataset, "num_classes", None)
        if num_classes is None:
            num_classes = int(y.max()) + 1 if len(y) else 0
        image_shape = getattr(self.source, "image_shape", None) or getattr(dataset, "image_shape", None)
        if image_shape is None:
            image_shape = _inferred_image_shape(sample_shape)
        elif len(image_shape) == 2:
            image_shape = (1, *image_shape)
        if image_shape is not None and int(np.prod(image_shape)) != int(np.prod(sample_shape)):
            raise ValueError(f"task {self.name!r}: image_shape {tuple(image_shape)} does not match samples of shape "
                             f"{sample_shape}")
        feature_range = getattr(self.source, "feature_range", None) or getattr(dataset, "feature_range", None)
        return DataInfo(int(num_classes), sample_shape, tuple(int(s) for s in image_shape) if image_shape else None,
                        tuple(float(v) for v in feature_range) if feature_range else None)

    def _check_dataset(self, data: Any, what: str) -> Dataset:
        if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            raise ValueError(f"task {self.name!r}: {what} returned a {type(data).__name__}, not a map-style "
                             "torch.utils.data.Dataset of (x, y) samples")
        return data

    def _check_metrics(self, metrics: Any, what: str) -> dict:
        if metrics is None:
            return {}
        if not isinstance(metrics, Mapping):
            raise ValueError(f"task {self.name!r}: {what} returned a {type(metrics).__name__}, not a dict of metrics")
        return dict(metrics)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {_describe(self.source)})"


def _describe(source: Any) -> str:
    if isinstance(source, ModuleType):
        return f"module {source.__name__}"
    return f"{type(source).__module__}.{type(source).__qualname__}"


def _first_arrays(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """x and y of a dataset as numpy arrays (array-backed datasets without a copy of every sample)."""
    x, y = tensors_of(dataset)
    return x.detach().cpu().numpy(), y.detach().cpu().numpy()


def _inferred_image_shape(sample_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    if len(sample_shape) == 3 and 1 <= sample_shape[0] <= 4 and min(sample_shape[1:]) >= 2:
        return sample_shape  # type: ignore[return-value]
    if len(sample_shape) == 2 and min(sample_shape) >= 2:
        return (1, *sample_shape)
    return None


def as_arrays(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of a task's dataset as numpy ``(x, y)``: what attacks and the data audit work on."""
    x, y = _first_arrays(dataset)
    if y.ndim != 1:
        raise ValueError(f"labels must be integers, one per sample; got shape {y.shape}")
    return x, y.astype(np.int64, copy=False)


@lru_cache(maxsize=16)
def load_task(spec: str) -> Task:
    """Resolve run-config ``task``: a built-in name, ``package.module`` or ``package.module:attr``.

    ``attr`` may name a module-like object or a class (instantiated without arguments).

    Raises
    ------
    ValueError
        When nothing can be imported under that name, or it lacks a required function; the
        message lists the built-in names.
    """
    name = str(spec).strip()
    target = BUILTIN_TASKS.get(name, name)
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task {name!r}: cannot import {module_name!r} ({exc}); built-in tasks: "
                         f"{sorted(BUILTIN_TASKS)}, or give 'package.module[:attr]'") from exc
    source: Any = module
    if attr:
        try:
            source = getattr(module, attr)
        except AttributeError as exc:
            raise ValueError(f"task {name!r}: module {module_name!r} has no attribute {attr!r}") from exc
        if inspect.isclass(source):
            source = source()
    return Task(source, name)


#: ``train`` and ``evaluate`` signatures, for documentation and type checkers.
TrainFn = Callable[[nn.Module, Dataset, Mapping[str, Any], torch.device], dict]
EvaluateFn = Callable[[nn.Module, Dataset, torch.device], dict]
