"""Built-in datasets, held in memory, and their federated partitions.

Every dataset is an :class:`ArrayDataset`: features ``x`` of shape (N, *sample_shape) and int64
labels ``y`` of shape (N,), plus what Phalanx knows of them (classes, image shape, valid range).
It is a ``torch.utils.data.Dataset`` of ``(x, y)`` samples, so a task can hand it to anything
that takes a dataset. The built-in names (run-config ``dataset``):

``digits``
    scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), pixels scaled to [0, 1]: the
    offline default. Flat (N, 64) rows with ``image_shape = (1, 8, 8)``; :meth:`ArrayDataset.as_images`
    gives (N, 1, 8, 8) for convolutional models.
``synthetic``
    Gaussian class clusters in 32 dimensions, generated from a fixed seed (no image shape).
``images``
    A generated CIFAR-10-shaped dataset (3 x 32 x 32, 10 classes, 3,000 images; see
    :mod:`client.generated_images`), learnable, offline.
``hf:<hub name>``
    An image dataset from the Hugging Face hub through flwr-datasets (online users; see
    :mod:`client.hf`).

The server keeps a held-out test split (:func:`server_test_split`, a fixed 20%) that no client
trains on; the rest (:func:`client_pool`) is divided among the clients by the run's
partitioner (:mod:`client.partition`, flwr-datasets' partitioners).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

#: Seed of the train/test split: fixed so that runs with different seeds share one test set.
TEST_SPLIT_SEED = 12345
TEST_FRACTION = 0.2
#: Names :func:`load_dataset` accepts besides ``hf:<hub name>``.
BUILTIN_DATASETS = ("digits", "synthetic", "images")


@dataclass(frozen=True, eq=False)
class ArrayDataset(TorchDataset):
    """A labelled dataset held in memory.

    Attributes
    ----------
    x : np.ndarray
        Features, (N, *sample_shape), float32 for the built-in datasets.
    y : np.ndarray
        Labels, (N,) int64 in ``[0, num_classes)``.
    num_classes : int
        Number of classes.
    image_shape : tuple[int, int, int] | None
        ``(C, H, W)`` when every sample is an image (either ``sample_shape`` itself or flat with
        ``C * H * W`` features), else None. Used by backdoor triggers and the data audit.
    feature_range : tuple[float, float] | None
        The valid range of every feature, when the dataset has one.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    image_shape: tuple[int, ...] | None = None
    feature_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.x.ndim < 1 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"ArrayDataset: x must be (N, ...) and y (N,), got {self.x.shape} and {self.y.shape}")
        if self.image_shape is not None:
            shape = tuple(int(s) for s in self.image_shape)
            if len(shape) == 2:  # (H, W): one channel
                shape = (1, *shape)
            if len(shape) != 3 or int(np.prod(shape)) != self.num_features:
                raise ValueError(f"ArrayDataset: image_shape {self.image_shape} does not match samples of shape "
                                 f"{self.sample_shape}")
            object.__setattr__(self, "image_shape", shape)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.asarray(self.x[index])), int(self.y[index])

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` as tensors, as ``torch.utils.data.TensorDataset.tensors`` gives them."""
        return torch.from_numpy(np.asarray(self.x)), torch.from_numpy(np.asarray(self.y))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def num_features(self) -> int:
        """Number of features per sample (all dimensions of a sample together)."""
        return int(np.prod(self.sample_shape, dtype=np.int64))

    def digest(self) -> str:
        """SHA-256 of the features and labels: which data an update was trained on."""
        h = hashlib.sha256()
        for array in (self.x, self.y):
            h.update(f"{array.dtype.str}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        """The rows at ``indices`` as a new dataset with the same metadata."""
        return self.with_arrays(self.x[indices], self.y[indices])

    def with_arrays(self, x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        """The same metadata over other samples (a poisoned or audited copy)."""
        return ArrayDataset(x, y, self.num_classes, self.image_shape, self.feature_range)

    def flat(self) -> ArrayDataset:
        """Samples as flat (N, F) rows (what a multi-layer perceptron takes)."""
        return self.with_arrays(self.x.reshape(len(self.x), -1), self.y)

    def as_images(self) -> ArrayDataset:
        """Samples as (N, C, H, W) images; ValueError when the dataset has no image shape."""
        if self.image_shape is None:
            raise ValueError(f"the samples (shape {self.sample_shape}) are not images: the dataset has no image_shape")
        return self.with_arrays(self.x.reshape(len(self.x), *self.image_shape), self.y)


#: The name earlier versions used; kept for code that imports it.
Dataset = ArrayDataset


def _digits() -> ArrayDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return ArrayDataset(x, bunch.target.astype(np.int64), 10, (1, 8, 8), (0.0, 1.0))


def _synthetic(num_samples: int = 3000, num_features: int = 32, num_classes: int = 10) -> ArrayDataset:
    # A fixed generator: the dataset is part of the problem, not of the run's randomness.
    rng = np.random.default_rng(2024)
    centres = rng.normal(0.0, 1.0, size=(num_classes, num_features))
    y = rng.integers(0, num_classes, size=num_samples)
    x = centres[y] + rng.normal(0.0, 1.0, size=(num_samples, num_features))
    return ArrayDataset(x.astype(np.float32), y.astype(np.int64), num_classes)


def _images() -> ArrayDataset:
    from client.generated_images import NUM_CLASSES, generate_images

    x, y = generate_images()
    return ArrayDataset(x, y, NUM_CLASSES, tuple(x.shape[1:]), (0.0, 1.0))


def _check_name(name: str) -> None:
    if name in BUILTIN_DATASETS or (name.startswith("hf:") and len(name) > 3):
        return
    raise ValueError(f"unknown dataset {name!r}: use one of {BUILTIN_DATASETS} or 'hf:<hub name>'")


@lru_cache(maxsize=4)
def load_dataset(name: str) -> ArrayDataset:
    """Load a whole built-in dataset by its run-config name (``digits``, ``synthetic``, ``images``).

    Raises
    ------
    ValueError
        For an unknown name, and for ``hf:`` names: hub datasets come with their own splits
        (:func:`server_test_split`, :func:`load_partition`).
    """
    _check_name(name)
    if name.startswith("hf:"):
        raise ValueError(f"dataset {name!r} is loaded split by split (server_test_split, load_partition)")
    return {"digits": _digits, "synthetic": _synthetic, "images": _images}[name]()


def _split_indices(num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(TEST_SPLIT_SEED).permutation(num_samples)
    num_test = int(round(TEST_FRACTION * num_samples))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


@lru_cache(maxsize=8)
def server_test_split(name: str) -> ArrayDataset:
    """The held-out split the server evaluates on; no client ever trains on it."""
    _check_name(name)
    if name.startswith("hf:"):
        from client.hf import hub_test_split

        return hub_test_split(name[3:])
    data = load_dataset(name)
    return data.subset(_split_indices(len(data))[1])


@lru_cache(maxsize=8)
def client_pool(name: str) -> ArrayDataset:
    """Every sample the clients share among them (the complement of the server's test split)."""
    data = load_dataset(name)
    return data.subset(_split_indices(len(data))[0])


def partition(labels: np.ndarray, num_partitions: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Sample indices per client with the ``auto`` partitioner (IID for alpha 0, else Dirichlet).

    Shorthand for :func:`client.partition.partition_indices`.
    """
    from client.partition import partition_indices

    return partition_indices(labels, num_partitions, partitioner="auto", alpha=alpha, seed=seed)


@lru_cache(maxsize=64)
def load_partition(
    name: str,
    partition_id: int,
    num_partitions: int,
    alpha: float = 0.0,
    seed: int = 0,
    partitioner: str = "auto",
    classes_per_partition: int = 2,
) -> ArrayDataset:
    """The training data of one client.

    Parameters
    ----------
    name : str
        Dataset name (see :func:`load_dataset`, or ``hf:<hub name>``).
    partition_id : int
        This client's index in ``[0, num_partitions)``.
    num_partitions : int
        Number of clients the pool is split among.
    alpha : float
        Dirichlet concentration (0 = IID with the ``auto`` partitioner).
    seed : int
        Seed of the split.
    partitioner : str
        See :func:`client.partition.partition_indices`.
    classes_per_partition : int
        Classes or shards per client for the pathological and shard partitioners.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    _check_name(name)
    if name.startswith("hf:"):
        from client.hf import hub_partition

        return hub_partition(name[3:], partition_id, num_partitions, partitioner=partitioner, alpha=alpha, seed=seed,
                             classes_per_partition=classes_per_partition)
    from client.partition import partition_indices

    pool = client_pool(name)
    parts = partition_indices(pool.y, num_partitions, partitioner=partitioner, alpha=alpha, seed=seed,
                              classes_per_partition=classes_per_partition)
    return pool.subset(parts[partition_id])


def export_partitions(
    name: str,
    num_partitions: int,
    alpha: float,
    seed: int,
    out_dir: str | Path,
    *,
    private_key=None,
    dataset_id: str | None = None,
    version: int | None = None,
    expires=None,
) -> list[Path]:
    """Write each client's partition to ``out_dir/<partition-id>/train.npz`` with a manifest.

    This is how a data owner prepares verified data for the ``data-dir`` run-config key; with
    an Ed25519 ``private_key`` the manifests are signed. Each manifest binds its partition id and
    ``dataset_id`` (default: ``name``), so one partition's folder is refused by a node that holds
    another; ``version`` and ``expires`` are bound when given (see ``client.integrity.write_manifest``).

    Returns
    -------
    list[Path]
        The partition directories, in partition order.
    """
    from client.integrity import write_manifest

    folders = []
    for partition_id in range(num_partitions):
        data = load_partition(name, partition_id, num_partitions, alpha, seed)
        folder = Path(out_dir) / str(partition_id)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "train.npz", x=data.x, y=data.y)
        write_manifest(folder, private_key=private_key, dataset_id=dataset_id or name, partition_id=partition_id,
                       version=version, expires=expires)
        folders.append(folder)
    return folders
