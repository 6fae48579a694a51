"""Data poisoning: each attack's defining transformation of a local training set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.hooks import attack_role
from simulations.attacks import build, malicious_partitions
from simulations.attacks.triggers import Trigger

NUM_CLASSES = 10
IMAGE = (8, 8)


@pytest.fixture
def data():
    """101 8x8 "images" with pixels in [0, 0.9] (so no clean row carries a trigger) and labels 0..9."""
    rng = np.random.default_rng(0)
    x = (rng.random((101, 64)) * 0.9).astype(np.float32)
    y = np.arange(101, dtype=np.int64) % NUM_CLASSES
    return x, y


def poison(name, x, y, *, seed=1, image_shape=IMAGE, **params):
    """Run ``poison_data_indexed`` on copies, checking that the inputs are left untouched."""
    x_before, y_before = x.copy(), y.copy()
    out = build(name, **params).poison_data_indexed(
        x, y, num_classes=NUM_CLASSES, image_shape=image_shape, rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)
    x_out, y_out, rows = out
    assert x_out.dtype == np.float32 and y_out.dtype == np.int64 and x_out.shape == x.shape
    return x_out, y_out, rows


# --- label flips ----------------------------------------------------------------------------------


def test_label_flip_default_reverses_every_label(data):
    x, y = data
    x_out, y_out, rows = poison("label-flip", x, y)
    np.testing.assert_array_equal(y_out, NUM_CLASSES - 1 - y)
    np.testing.assert_array_equal(x_out, x)
    np.testing.assert_array_equal(rows, np.flatnonzero(y_out != y))


def test_label_flip_all_to_one_maps_every_label_to_the_target(data):
    x, y = data
    _, y_out, rows = poison("label-flip", x, y, mode="all-to-one", target=4)
    assert (y_out == 4).all()
    np.testing.assert_array_equal(rows, np.flatnonzero(y != 4))


def test_label_flip_all_to_one_defaults_to_class_zero(data):
    _, y_out, _ = poison("label-flip", *data, mode="all-to-one")
    assert (y_out == 0).all()


def test_poison_data_hook_returns_the_same_as_the_indexed_form(data):
    x, y = data
    attack = build("label-flip")
    x_out, y_out = attack.poison_data(x, y, num_classes=NUM_CLASSES, image_shape=IMAGE, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(y_out, NUM_CLASSES - 1 - y)


def test_target_outside_the_dataset_classes_is_refused(data):
    with pytest.raises(ValueError, match=r"label-flip: target=12 is not a class"):
        poison("label-flip", *data, mode="all-to-one", target=12)


@pytest.mark.parametrize("name", ["label-flip", "targeted-label-flip", "backdoor"])
def test_only_malicious_clients_poison_their_data(name):
    attackers = set(malicious_partitions(10, 3, seed=5))
    for partition in range(10):
        role = attack_role(name, "", partition_id=partition, num_clients=10, num_malicious=3, seed=5)
        assert role.malicious == (partition in attackers)
        assert role.transforms_data == (partition in attackers)


@pytest.mark.parametrize("name", ["sign-flip", "scaling", "gaussian", "alie", "min-max", "mimic"])
def test_model_poisoning_attacks_leave_data_alone(name, data):
    x, y = data
    x_out, y_out = build(name).poison_data(x, y, num_classes=NUM_CLASSES, image_shape=IMAGE, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(x_out, x)
    np.testing.assert_array_equal(y_out, y)


def test_targeted_label_flip_changes_only_the_source_class(data):
    x, y = data
    x_out, y_out, rows = poison("targeted-label-flip", x, y, source=3, target=8)
    np.testing.assert_array_equal(rows, np.flatnonzero(y == 3))
    assert (y_out[y == 3] == 8).all()
    np.testing.assert_array_equal(y_out[y != 3], y[y != 3])
    np.testing.assert_array_equal(x_out, x)


# --- backdoor -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.55, 1.0])
def test_backdoor_stamps_exactly_round_fraction_n_rows_and_relabels_them(data, fraction):
    x, y = data
    x_out, y_out, rows = poison("backdoor", x, y, fraction=fraction, target=2)
    triggered = np.flatnonzero(Trigger(3, 1.0).present(x_out, IMAGE))
    assert len(triggered) == round(fraction * len(y))
    np.testing.assert_array_equal(triggered, rows)
    assert (y_out[rows] == 2).all()
    clean = np.setdiff1d(np.arange(len(y)), rows)
    np.testing.assert_array_equal(x_out[clean], x[clean])
    np.testing.assert_array_equal(y_out[clean], y[clean])


def test_backdoor_trigger_is_the_bottom_right_patch_at_max_value(data):
    x, y = data
    x_out, _, rows = poison("backdoor", x, y, fraction=0.5)
    changed = (x_out != x).reshape(-1, *IMAGE).any(axis=0)
    expected = np.zeros(IMAGE, dtype=bool)
    expected[5:, 5:] = True
    np.testing.assert_array_equal(changed, expected)
    assert (x_out[rows].reshape(-1, *IMAGE)[:, 5:, 5:] == 1.0).all()


def test_backdoor_rows_depend_on_the_client_generator(data):
    _, _, first = poison("backdoor", *data, seed=1)
    _, _, again = poison("backdoor", *data, seed=1)
    _, _, other = poison("backdoor", *data, seed=2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_backdoor_without_image_shape_uses_the_last_features(data):
    x, y = data
    x_out, _, rows = poison("backdoor", x, y, image_shape=None, size=2, value=3.0)
    changed_columns = np.flatnonzero((x_out != x).any(axis=0))
    np.testing.assert_array_equal(changed_columns, np.arange(60, 64))
    assert (x_out[rows][:, 60:] == 3.0).all()


def test_backdoor_refuses_a_trigger_that_does_not_fit(data):
    with pytest.raises(ValueError, match="backdoor: a 9x9 trigger does not fit a 8x8 image"):
        poison("backdoor", *data, size=9)
    with pytest.raises(ValueError, match=r"backdoor: image_shape \(7, 7\) does not match 64 features"):
        poison("backdoor", *data, image_shape=(7, 7))


def test_triggered_testset_excludes_target_rows_stamps_all_and_labels_target(data):
    x, y = data
    x_test, y_test = build("backdoor", target=6).triggered_testset(x, y, image_shape=IMAGE)
    keep = y != 6
    assert len(y_test) == keep.sum() and (y_test == 6).all()
    assert Trigger(3, 1.0).present(x_test, IMAGE).all()
    outside = np.ones(IMAGE, dtype=bool)
    outside[5:, 5:] = False
    np.testing.assert_array_equal(x_test.reshape(-1, *IMAGE)[:, outside], x[keep].reshape(-1, *IMAGE)[:, outside])


# --- corrupted source -----------------------------------------------------------------------------


def test_corrupted_source_is_applied_at_the_chosen_partitions_which_stay_honest_clients():
    """num-malicious counts the clients whose data source is corrupted; they send no crafted update."""
    corrupted = set(malicious_partitions(10, 3, seed=5))
    for partition in range(10):
        role = attack_role("corrupted-source", "fraction=0.5", partition_id=partition, num_clients=10,
                           num_malicious=3, seed=5)
        assert role.transforms_data == (partition in corrupted)
        assert not role.transforms_update
        assert role.attack.poison_update(torch.ones(3), rng=torch.Generator()).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_corrupted_source_flip_changes_the_label_of_exactly_the_reported_rows(data, fraction):
    x, y = data
    attack = build("corrupted-source", fraction=fraction)
    x_out, y_out, rows = attack.corrupt(x, y, num_classes=NUM_CLASSES, image_shape=IMAGE, rng=np.random.default_rng(3))
    assert len(rows) == round(fraction * len(y))
    np.testing.assert_array_equal(np.flatnonzero(y_out != y), rows)
    assert ((0 <= y_out) & (y_out < NUM_CLASSES)).all()
    np.testing.assert_array_equal(x_out, x)


def test_corrupted_source_default_fraction_is_one_fifth(data):
    _, _, rows = poison("corrupted-source", *data)
    assert len(rows) == round(0.2 * 101)


def test_corrupted_source_trigger_mode_stamps_and_relabels_the_reported_rows(data):
    x, y = data
    x_out, y_out, rows = poison("corrupted-source", x, y, mode="trigger", fraction=0.4, target=1)
    assert len(rows) == round(0.4 * len(y))
    np.testing.assert_array_equal(np.flatnonzero(Trigger(3, 1.0).present(x_out, IMAGE)), rows)
    assert (y_out[rows] == 1).all()
    attack = build("corrupted-source", mode="trigger", target=1)
    x_test, y_test = attack.triggered_testset(x, y, image_shape=IMAGE)
    assert len(y_test) == (y != 1).sum() and (y_test == 1).all()
    assert build("corrupted-source").triggered_testset(x, y, image_shape=IMAGE) is None
