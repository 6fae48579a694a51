"""Federated partitioning through flwr-datasets' partitioners, on in-memory data.

Flower Datasets (``flwr_datasets.partitioner``) splits a Hugging Face ``datasets.Dataset`` among
clients: IID, Dirichlet label skew, pathological (a few classes per client), shards. Phalanx
runs those partitioners on a small in-memory table of (sample index, label) built from any
labelled dataset, so the built-in datasets, a hub dataset and a user's arrays are split the
same way, offline. Each partition comes back as the sorted indices of its samples.

``partitioner = "auto"`` is IID when ``alpha`` is 0 and Dirichlet(alpha) otherwise. IID shuffles
the table with the seed and cuts it into contiguous near-equal parts: the same partitions
Phalanx's earlier hand-written split gave for ``alpha = 0`` (``numpy.random.default_rng(seed)
.permutation`` then ``numpy.array_split``), so IID digits runs keep their numbers. Dirichlet
partitions come from flwr-datasets' own draw, which differs from the earlier split.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

#: Names accepted by :func:`partition_indices`.
PARTITIONERS = ("auto", "iid", "dirichlet", "pathological", "shard")
#: Smallest Dirichlet partition accepted (flwr-datasets redraws until every part has this many).
MIN_PARTITION_SIZE = 10
#: Batches of 10 Dirichlet draws tried before giving up (see :func:`_cached_partitions`).
OUTER_TRIES = 10


def resolve_partitioner(partitioner: str, alpha: float) -> str:
    """``auto`` as IID (alpha 0) or Dirichlet (alpha > 0); other names as they are."""
    if partitioner not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {partitioner!r}: use one of {PARTITIONERS}")
    if partitioner == "auto":
        return "iid" if alpha == 0 else "dirichlet"
    return partitioner


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    *,
    partitioner: str = "auto",
    alpha: float = 0.0,
    seed: int = 0,
    classes_per_partition: int = 2,
) -> list[np.ndarray]:
    """Split sample indices among ``num_partitions`` clients.

    Parameters
    ----------
    labels : np.ndarray
        (N,) integer labels.
    num_partitions : int
        Number of clients.
    partitioner : str
        ``auto``, ``iid``, ``dirichlet`` (label skew of concentration ``alpha``),
        ``pathological`` (``classes_per_partition`` classes per client) or ``shard``
        (``classes_per_partition`` label-sorted shards per client).
    alpha : float
        Dirichlet concentration; small alpha gives strongly skewed label mixes.
    seed : int
        Seed of the split: the same seed gives the same partitions.
    classes_per_partition : int
        Classes (pathological) or shards (shard) per client.

    Returns
    -------
    list[np.ndarray]
        One sorted int64 index array per client. IID, Dirichlet and shard partitions together
        cover every sample exactly once; pathological partitions cover the classes assigned.

    Raises
    ------
    ValueError
        For impossible arguments, naming them, or when flwr-datasets cannot draw the split.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if len(labels) < num_partitions:
        raise ValueError(f"{len(labels)} samples cannot be split among {num_partitions} clients")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (0 = IID), got {alpha}")
    kind = resolve_partitioner(partitioner, alpha)
    if kind == "dirichlet" and not alpha > 0:
        raise ValueError("the dirichlet partitioner needs alpha > 0")
    parts = _cached_partitions(labels.astype(np.int64).tobytes(), num_partitions, kind, float(alpha), int(seed),
                               int(classes_per_partition))
    return [part.copy() for part in parts]


@lru_cache(maxsize=16)
def _cached_partitions(label_bytes: bytes, num_partitions: int, kind: str, alpha: float, seed: int,
                       classes_per_partition: int) -> tuple[np.ndarray, ...]:
    labels = np.frombuffer(label_bytes, dtype=np.int64)
    table = _table(labels)
    if kind == "iid":
        table = table.shuffle(seed=seed)  # IidPartitioner cuts contiguous shards: shuffle first
    # flwr-datasets' Dirichlet draw gives up after 10 tries at min_partition_size; small alpha
    # with many clients needs more, so up to OUTER_TRIES draws of 10 are made, each from a seed
    # derived from the run's: still a function of (seed, attempt) only.
    last_error: ValueError | None = None
    for attempt in range(OUTER_TRIES if kind == "dirichlet" else 1):
        draw_seed = seed if attempt == 0 else int(np.random.default_rng([seed, attempt]).integers(2**31))
        partitioner = _partitioner(kind, num_partitions, alpha, draw_seed, classes_per_partition, len(labels))
        partitioner.dataset = table
        try:
            parts = [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
                     for i in range(num_partitions)]
        except ValueError as exc:  # flwr-datasets' own message says which condition failed
            last_error = exc
            continue
        return tuple(parts)
    raise ValueError(f"partitioner {kind!r} (alpha={alpha}, seed={seed}, {num_partitions} clients) could not split "
                     f"{len(labels)} samples: {last_error}; raise alpha or lower num-clients") from last_error


def _table(labels: np.ndarray):
    from datasets import Dataset

    return Dataset.from_dict({"index": np.arange(len(labels), dtype=np.int64), "label": labels})


def _partitioner(kind: str, num_partitions: int, alpha: float, seed: int, classes_per_partition: int,
                 num_samples: int):
    from flwr_datasets import partitioner as fp

    if kind == "iid":
        return fp.IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return fp.DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=min(MIN_PARTITION_SIZE, num_samples // num_partitions),
            self_balancing=False, shuffle=True, seed=seed,
        )
    if kind == "pathological":
        return fp.PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label",
            num_classes_per_partition=classes_per_partition, class_assignment_mode="random", shuffle=True, seed=seed,
        )
    return fp.ShardPartitioner(
        num_partitions=num_partitions, partition_by="label", num_shards_per_partition=classes_per_partition,
        shuffle=True, seed=seed,
    )
