"""Image classification datasets from the Hugging Face hub, through flwr-datasets (online users).

``dataset = "hf:<hub name>"`` (e.g. ``hf:mnist``, ``hf:fashion_mnist``, ``hf:cifar10``,
``hf:uoft-cs/cifar10``) loads a hub dataset with ``flwr_datasets.FederatedDataset``: each client
loads its own partition of the ``train`` split, cut by the run's partitioner (the same
flwr-datasets partitioners :mod:`client.partition` uses), and the server evaluates on the
``test`` split (a dataset without one is refused, naming it). It needs the hub: offline machines use the built-in datasets. The image and label columns are
found by name (``image``/``img``/``pixels`` and ``label``/``labels``/``fine_label``/``target``:
what mnist, fashion_mnist and cifar10 use); images become (C, H, W) float32 in [0, 1].

:func:`arrays_from_table` is the conversion, and works on any in-memory ``datasets.Dataset``
(that is how the tests check it offline).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

#: Column names tried, in order, for the image and the label.
IMAGE_COLUMNS = ("image", "img", "pixels")
LABEL_COLUMNS = ("label", "labels", "fine_label", "target")


def _require_datasets(name: str):
    try:
        import datasets  # noqa: F401
        import flwr_datasets  # noqa: F401
    except ImportError as exc:  # pragma: no cover - flwr-datasets is a dependency
        raise ValueError(f"dataset 'hf:{name}' needs flwr-datasets: pip install flwr-datasets") from exc


def find_columns(column_names: list[str], name: str = "table") -> tuple[str, str]:
    """The (image column, label column) of a table, or ValueError naming what it has."""
    image = next((c for c in IMAGE_COLUMNS if c in column_names), None)
    label = next((c for c in LABEL_COLUMNS if c in column_names), None)
    if image is None or label is None:
        raise ValueError(f"dataset {name!r}: need an image column (one of {IMAGE_COLUMNS}) and a label column "
                         f"(one of {LABEL_COLUMNS}), found {list(column_names)}")
    return image, label


def _as_chw(image) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:  # grayscale (H, W)
        return array[None]
    if array.ndim == 3:  # PIL and numpy images are (H, W, C)
        return np.moveaxis(array, -1, 0)
    raise ValueError(f"an image must be (H, W) or (H, W, C), got shape {array.shape}")


def arrays_from_table(table, name: str = "table", num_classes: int | None = None):
    """An in-memory ``datasets.Dataset`` of images and labels as an :class:`~client.data.ArrayDataset`.

    Parameters
    ----------
    table : datasets.Dataset
        With an image column (PIL images, or nested lists / arrays of pixels) and an integer
        label column.
    name : str
        The dataset's name, for error messages.
    num_classes : int, optional
        Number of classes; by default the label feature's ``num_classes`` when it is a
        ``ClassLabel``, else the largest label + 1.

    Returns
    -------
    ArrayDataset
        x (N, C, H, W) float32 in [0, 1] (8-bit pixels are divided by 255), y (N,) int64,
        ``image_shape = (C, H, W)``, ``feature_range = (0, 1)``.
    """
    from client.data import ArrayDataset

    image_col, label_col = find_columns(list(table.column_names), name)
    if len(table) == 0:
        raise ValueError(f"dataset {name!r} is empty")
    images = np.stack([_as_chw(item) for item in table[image_col]])
    if images.max() > 1.0:
        images = images / 255.0
    labels = np.asarray(table[label_col], dtype=np.int64)
    if num_classes is None:
        feature = table.features.get(label_col) if hasattr(table, "features") else None
        num_classes = int(getattr(feature, "num_classes", 0) or labels.max() + 1)
    return ArrayDataset(images.astype(np.float32), labels, int(num_classes), tuple(images.shape[1:]), (0.0, 1.0))


@lru_cache(maxsize=4)
def federated_dataset(name: str, partitioner: str, num_partitions: int, alpha: float, seed: int,
                      classes_per_partition: int):
    """flwr-datasets' ``FederatedDataset`` over the hub dataset ``name`` (downloads it once)."""
    _require_datasets(name)
    from flwr_datasets import FederatedDataset

    from client.partition import _partitioner, resolve_partitioner

    kind = resolve_partitioner(partitioner, alpha)
    split = _partitioner(kind, num_partitions, alpha, seed, classes_per_partition, num_samples=10**9)
    return FederatedDataset(dataset=name, partitioners={"train": split}, shuffle=True, seed=seed)


def hub_partition(name: str, partition_id: int, num_partitions: int, *, partitioner: str, alpha: float, seed: int,
                  classes_per_partition: int):
    """One client's partition of the hub dataset's ``train`` split."""
    fds = federated_dataset(name, partitioner, num_partitions, alpha, seed, classes_per_partition)
    return arrays_from_table(fds.load_partition(partition_id, "train"), f"hf:{name}")


@lru_cache(maxsize=2)
def hub_test_split(name: str):
    """The server's held-out split of the hub dataset: its ``test`` split."""
    _require_datasets(name)
    from datasets import load_dataset

    try:
        table = load_dataset(name, split="test")
    except ValueError as exc:
        raise ValueError(f"dataset 'hf:{name}' has no 'test' split for the server to evaluate on") from exc
    return arrays_from_table(table, f"hf:{name}")
