"""Datasets and federated partitioning.

Every dataset is returned as float32 features ``x`` of shape (N, F) and int64 labels ``y`` of
shape (N,). The offline default is scikit-learn's bundled ``digits`` (8x8 images scaled to
[0, 1], 10 classes), which needs no download. ``synthetic`` is generated from the seed.
``hf:<name>`` loads a Hugging Face dataset through flwr-datasets for users who are online.

The server keeps a held-out test split (``server_test_split``) that no client trains on; the
rest is divided among the clients by ``partition`` (IID for ``alpha == 0``, else a
Dirichlet(alpha) label skew).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

#: Seed of the train/test split: fixed so that runs with different seeds share one test set.
TEST_SPLIT_SEED = 12345
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset held in memory.

    Attributes
    ----------
    x : np.ndarray
        Features, (N, F) float32.
    y : np.ndarray
        Labels, (N,) int64 in ``[0, num_classes)``.
    num_classes : int
        Number of classes.
    image_shape : tuple[int, int] | None
        Shape of one sample as an image, when the features are pixels (used by triggers and
        audits), else None.
    feature_range : tuple[float, float] | None
        The valid range of every feature, when the dataset has one.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    image_shape: tuple[int, int] | None = None
    feature_range: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_features(self) -> int:
        """Number of features per sample."""
        return int(self.x.shape[1])

    def digest(self) -> str:
        """SHA-256 of the features and labels: which data an update was trained on."""
        h = hashlib.sha256()
        for array in (self.x, self.y):
            h.update(f"{array.dtype.str}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()

    def subset(self, indices: np.ndarray) -> Dataset:
        """Return the rows at ``indices`` as a new dataset with the same metadata."""
        return Dataset(self.x[indices], self.y[indices], self.num_classes, self.image_shape, self.feature_range)


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return Dataset(x, bunch.target.astype(np.int64), 10, (8, 8), (0.0, 1.0))


def _synthetic(num_samples: int = 3000, num_features: int = 32, num_classes: int = 10) -> Dataset:
    # A fixed generator: the dataset is part of the problem, not of the run's randomness.
    rng = np.random.default_rng(2024)
    centres = rng.normal(0.0, 1.0, size=(num_classes, num_features))
    y = rng.integers(0, num_classes, size=num_samples)
    x = centres[y] + rng.normal(0.0, 1.0, size=(num_samples, num_features))
    return Dataset(x.astype(np.float32), y.astype(np.int64), num_classes)


def _huggingface(name: str) -> Dataset:
    """Load a whole Hugging Face dataset (needs the hub: online users only)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ValueError(
            f"dataset 'hf:{name}' needs the optional extra: pip install 'phalanx[hf]'"
        ) from exc
    table = load_dataset(name, split="train").with_format("numpy")
    columns = table.column_names
    label_col = next((c for c in ("label", "labels", "fine_label", "target") if c in columns), None)
    image_col = next((c for c in ("image", "img", "pixels") if c in columns), None)
    if label_col is None or image_col is None:
        raise ValueError(f"dataset 'hf:{name}': need an image and a label column, found {columns}")
    images = np.stack([np.asarray(img, dtype=np.float32) for img in table[image_col]])
    if images.ndim == 4:  # colour: average the channels, keep it a small model's problem
        images = images.mean(axis=-1)
    scale = 255.0 if images.max() > 1.0 else 1.0
    y = np.asarray(table[label_col], dtype=np.int64)
    shape = tuple(images.shape[1:3])
    x = (images.reshape(len(images), -1) / scale).astype(np.float32)
    return Dataset(x, y, int(y.max()) + 1, shape, (0.0, 1.0))  # type: ignore[arg-type]


@lru_cache(maxsize=4)
def load_dataset(name: str) -> Dataset:
    """Load a whole dataset by its run-config name.

    Parameters
    ----------
    name : str
        ``digits``, ``synthetic`` or ``hf:<hub name>``.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic()
    if name.startswith("hf:") and len(name) > 3:
        return _huggingface(name[3:])
    raise ValueError(f"unknown dataset {name!r}: use 'digits', 'synthetic' or 'hf:<hub name>'")


def _split_indices(num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(TEST_SPLIT_SEED).permutation(num_samples)
    num_test = int(round(TEST_FRACTION * num_samples))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def server_test_split(name: str) -> Dataset:
    """The held-out split the server evaluates on; no client ever trains on it."""
    data = load_dataset(name)
    return data.subset(_split_indices(len(data))[1])


def client_pool(name: str) -> Dataset:
    """Every sample the clients share among them (the complement of the server's test split)."""
    data = load_dataset(name)
    return data.subset(_split_indices(len(data))[0])


def partition(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Split sample indices among ``num_partitions`` clients.

    Parameters
    ----------
    labels : np.ndarray
        (N,) integer labels.
    num_partitions : int
        Number of clients.
    alpha : float
        Dirichlet concentration of each class's split over clients; ``0`` means IID (a uniform
        random split into near-equal parts). Small alpha gives strongly skewed label mixes.
    seed : int
        Seed of the split: the same seed gives the same partitions.
    min_size : int
        Smallest partition accepted; a Dirichlet draw with a smaller part is redrawn.
    max_tries : int
        Draws tried before giving up.

    Returns
    -------
    list[np.ndarray]
        One sorted index array per client; together they cover every sample exactly once.

    Raises
    ------
    ValueError
        For impossible arguments, or when no draw gives every client ``min_size`` samples.
    """
    num_samples = len(labels)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (0 = IID), got {alpha}")
    min_size = min(min_size, num_samples // num_partitions)
    if min_size < 1:
        raise ValueError(f"{num_samples} samples cannot be split among {num_partitions} clients")
    rng = np.random.default_rng(seed)
    if alpha == 0:
        return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_partitions)]
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return merged
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gave all {num_partitions} clients >= {min_size} samples "
        f"in {max_tries} draws; raise alpha or lower num-clients"
    )


@lru_cache(maxsize=64)
def load_partition(name: str, partition_id: int, num_partitions: int, alpha: float, seed: int) -> Dataset:
    """The training data of one client.

    Parameters
    ----------
    name : str
        Dataset name (see ``load_dataset``).
    partition_id : int
        This client's index in ``[0, num_partitions)``.
    num_partitions : int
        Number of clients the pool is split among.
    alpha : float
        Dirichlet concentration (0 = IID).
    seed : int
        Seed of the split.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    pool = client_pool(name)
    indices = partition(pool.y, num_partitions, alpha, seed)[partition_id]
    return pool.subset(indices)


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
