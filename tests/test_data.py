"""Datasets and Dirichlet partitioning: offline, seeded, complete and disjoint."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.data import client_pool, load_dataset, load_partition, partition, server_test_split


def test_digits_is_offline_and_scaled():
    data = load_dataset("digits")
    assert data.x.shape == (1797, 64) and data.x.dtype == np.float32
    assert data.x.min() >= 0.0 and data.x.max() <= 1.0
    assert set(np.unique(data.y)) == set(range(10)) and data.image_shape == (8, 8)


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


@settings(max_examples=30, deadline=None)
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
