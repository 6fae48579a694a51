"""Datasets and partitioning (flwr-datasets' partitioners): offline, seeded, complete and disjoint."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.data import ArrayDataset, client_pool, load_dataset, load_partition, partition, server_test_split
from client.partition import partition_indices


def test_digits_is_offline_and_scaled():
    data = load_dataset("digits")
    assert data.x.shape == (1797, 64) and data.x.dtype == np.float32
    assert data.x.min() >= 0.0 and data.x.max() <= 1.0
    assert set(np.unique(data.y)) == set(range(10)) and data.image_shape == (1, 8, 8)


def test_server_test_split_is_disjoint_from_the_clients_pool():
    test, pool = server_test_split("digits"), client_pool("digits")
    assert len(test) + len(pool) == 1797
    rows = {row.tobytes() + bytes([label]) for row, label in zip(pool.x, pool.y)}
    # digits has a few exact duplicate images: allow them, but nearly all test rows are unseen
    unseen = sum(row.tobytes() + bytes([label]) not in rows for row, label in zip(test.x, test.y))
    assert unseen >= 0.98 * len(test)


def test_synthetic_is_deterministic():
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert np.array_equal(a.x, b.x) and a.num_classes == 10


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="unknown dataset 'mnist-offline'"):
        load_dataset("mnist-offline")


@settings(max_examples=20, deadline=None)
@given(num_partitions=st.integers(1, 20), alpha=st.sampled_from([0.0, 0.1, 0.5, 1.0, 100.0]), seed=st.integers(0, 10_000))
def test_partition_covers_every_sample_exactly_once(num_partitions, alpha, seed):
    labels = np.random.default_rng(0).integers(0, 10, size=1000)
    parts = partition(labels, num_partitions, alpha, seed)
    assert len(parts) == num_partitions
    merged = np.concatenate(parts)
    assert np.array_equal(np.sort(merged), np.arange(1000))
    assert min(len(p) for p in parts) >= 10


def test_partition_is_seeded():
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    a = partition(labels, 5, 0.5, seed=3)
    b = partition(labels, 5, 0.5, seed=3)
    c = partition(labels, 5, 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_small_alpha_skews_labels_and_iid_does_not():
    labels = np.repeat(np.arange(10), 100)

    def mean_classes_per_client(alpha):
        parts = partition(labels, 10, alpha, seed=0)
        return np.mean([np.sum(np.bincount(labels[p], minlength=10) >= 5) for p in parts])

    assert mean_classes_per_client(0.0) >= 9
    assert mean_classes_per_client(0.1) < 6


def test_partition_rejects_impossible_requests():
    with pytest.raises(ValueError, match="alpha"):
        partition(np.zeros(100, dtype=int), 2, -1.0, 0)
    with pytest.raises(ValueError, match="cannot be split"):
        partition(np.zeros(3, dtype=int), 10, 0.0, 0)
    with pytest.raises(ValueError, match="partition-id 10"):
        load_partition("digits", 10, 10, 0.0, 0)


def test_iid_partitions_are_the_earlier_hand_written_split():
    """IID digits runs keep their numbers: flwr-datasets' IID cut equals permutation + array_split."""
    labels = client_pool("digits").y
    for seed in (0, 1, 7):
        ours = partition_indices(labels, 10, partitioner="iid", seed=seed)
        earlier = [np.sort(p) for p in np.array_split(np.random.default_rng(seed).permutation(len(labels)), 10)]
        assert all(np.array_equal(a, b) for a, b in zip(ours, earlier))


@pytest.mark.parametrize("kind", ["pathological", "shard"])
def test_pathological_and_shard_partitions_hold_few_classes(kind):
    labels = np.repeat(np.arange(10), 60)
    parts = partition_indices(labels, 10, partitioner=kind, seed=0, classes_per_partition=2)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    merged = np.concatenate(parts)
    assert len(np.unique(merged)) == len(merged)  # disjoint


def test_unknown_partitioner_is_named():
    with pytest.raises(ValueError, match="unknown partitioner 'zipf'"):
        partition_indices(np.zeros(100, dtype=int), 2, partitioner="zipf")


def test_generated_images_are_cifar_shaped_seeded_and_in_range():
    data = load_dataset("images")
    assert data.x.shape == (3000, 3, 32, 32) and data.x.dtype == np.float32
    assert data.image_shape == (3, 32, 32) and data.num_classes == 10
    assert 0.0 <= data.x.min() and data.x.max() <= 1.0
    counts = np.bincount(data.y, minlength=10)
    assert counts.min() > 200  # every class well represented
    from client.generated_images import generate_images

    x, y = generate_images(50)
    assert np.array_equal(x, generate_images(50)[0]) and np.array_equal(y, data.y[:50])


def test_generated_image_classes_are_separable_by_a_linear_probe():
    """Learnable: a linear model on the raw pixels is well above chance (a CNN does far better)."""
    from sklearn.linear_model import LogisticRegression

    train, test = client_pool("images"), server_test_split("images")
    probe = LogisticRegression(max_iter=300).fit(train.x.reshape(len(train), -1)[:1200], train.y[:1200])
    assert probe.score(test.x.reshape(len(test), -1), test.y) > 0.2  # chance: 0.1


def test_an_array_dataset_is_a_torch_dataset_of_samples():
    data = load_partition("digits", 0, 10, 0.0, 0)
    x, y = data[3]
    assert x.shape == (64,) and isinstance(y, int)
    images = data.as_images()
    assert images.x.shape == (len(data), 1, 8, 8) and images.digest() != data.digest()
    with pytest.raises(ValueError, match="not images"):
        load_dataset("synthetic").as_images()
    with pytest.raises(ValueError, match="does not match"):
        ArrayDataset(np.zeros((4, 10), np.float32), np.zeros(4, np.int64), 2, (1, 3, 3))
