"""Data poisoning: each attack's defining transformation of a local training set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    with pytest.raises(ValueError, match=r"backdoor: image_shape \(7, 7\) does not match samples of shape \(64,\)"):
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


# --- any image task: (N, C, H, W), flat C*H*W, and today's digits numbers ----------------------------

#: sha256[:16] of (x, y, rows) and of the triggered test set, recorded with the implementation that
#: knew only flat (N, 64) digits with image_shape (8, 8), before it was generalised to (C, H, W).
GOLDEN = [
    ("label-flip", {}, "480fd2e3eff71a28", None),
    ("label-flip", {"mode": "all-to-one", "target": 4}, "ad28e7a05b1c74df", None),
    ("targeted-label-flip", {}, "56ac513a208f313a", None),
    ("backdoor", {}, "ff3a4bf0be9a61d5", "fbdea01749534563"),
    ("backdoor", {"size": 2, "value": 0.5, "fraction": 0.6, "target": 3}, "f2bb12f3f402e44e", "d45e8b72d1f9468d"),
    ("corrupted-source", {}, "323e0f1f13ba9162", None),
    ("corrupted-source", {"mode": "trigger", "fraction": 0.4, "target": 1}, "658572d0efcac5ce", "e50abbea6cb67805"),
]


def digest(*arrays: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    for array in arrays:
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name, params, train_digest, test_digest", GOLDEN)
def test_digits_poisoning_is_bit_for_bit_what_it_was_before_images_were_generalised(name, params, train_digest,
                                                                                    test_digest):
    g = np.random.default_rng(2024)
    x, y = g.random((120, 64), dtype=np.float32), g.integers(0, 10, 120).astype(np.int64)
    x_test, y_test = g.random((50, 64), dtype=np.float32), g.integers(0, 10, 50).astype(np.int64)
    attack = build(name, **params)
    for shape in [(8, 8), (1, 8, 8)]:  # today's 2-tuple and the (C, H, W) the task interface gives
        out = attack.poison_data_indexed(x, y, num_classes=10, image_shape=shape, rng=np.random.default_rng([0, 3, 2]))
        assert digest(*out) == train_digest
        triggered = attack.triggered_testset(x_test, y_test, image_shape=shape)
        assert (None if triggered is None else digest(*triggered)) == test_digest


def test_flat_digits_trigger_pixels_match_the_original_row_major_formula(data):
    """The original implementation wrote flat indices ``r * W + c`` for the last ``size`` rows and columns."""
    x, y = data
    for size in (1, 2, 3, 8):
        rows, cols = np.arange(8 - size, 8), np.arange(8 - size, 8)
        original = (rows[:, None] * 8 + cols[None, :]).ravel()
        np.testing.assert_array_equal(Trigger(size).feature_indices(64, (8, 8)), original)
        np.testing.assert_array_equal(Trigger(size).feature_indices((64,), (1, 8, 8)), original)


@pytest.fixture
def cifar_like():
    """40 CIFAR-shaped images (3, 32, 32) with pixels in [0, 0.9]."""
    rng = np.random.default_rng(1)
    return (rng.random((40, 3, 32, 32)) * 0.9).astype(np.float32), (np.arange(40) % NUM_CLASSES).astype(np.int64)


def test_backdoor_on_chw_images_stamps_the_bottom_right_patch_in_every_channel(cifar_like):
    x, y = cifar_like
    x_out, y_out, rows = poison("backdoor", x, y, image_shape=(3, 32, 32), fraction=0.5, size=4, target=7)
    assert x_out.shape == x.shape
    changed = (x_out != x).any(axis=0)                      # (3, 32, 32)
    expected = np.zeros((3, 32, 32), dtype=bool)
    expected[:, 28:, 28:] = True
    np.testing.assert_array_equal(changed, expected)
    assert (x_out[rows][:, :, 28:, 28:] == 1.0).all()
    assert (y_out[rows] == 7).all()
    assert Trigger(4).present(x_out, (3, 32, 32))[rows].all()


def test_flat_and_chw_storage_of_the_same_images_are_poisoned_identically(cifar_like):
    x, y = cifar_like
    chw = poison("corrupted-source", x, y, image_shape=(3, 32, 32), mode="trigger", seed=4)
    flat = poison("corrupted-source", x.reshape(40, -1), y, image_shape=(3, 32, 32), mode="trigger", seed=4)
    np.testing.assert_array_equal(flat[0], chw[0].reshape(40, -1))
    np.testing.assert_array_equal(flat[1], chw[1])
    np.testing.assert_array_equal(flat[2], chw[2])


def test_single_channel_images_may_be_stored_flat_as_hw_or_as_chw(data):
    x, y = data
    reference = poison("backdoor", x, y, image_shape=(8, 8))[0]
    for stored, shape in [(x, (1, 8, 8)), (x.reshape(-1, 8, 8), (8, 8)), (x.reshape(-1, 1, 8, 8), (1, 8, 8))]:
        out = poison("backdoor", stored, y, image_shape=shape)[0]
        np.testing.assert_array_equal(out.reshape(len(x), -1), reference)


@pytest.mark.parametrize("name", ["label-flip", "targeted-label-flip", "corrupted-source"])
def test_label_attacks_work_on_chw_images_and_leave_pixels_alone(name, cifar_like):
    x, y = cifar_like
    x_out, y_out, rows = poison(name, x, y, image_shape=(3, 32, 32))
    np.testing.assert_array_equal(x_out, x)
    assert len(rows) > 0 and (y_out[rows] != y[rows]).all()


def test_outputs_keep_a_float64_sample_dtype_and_an_int32_label_dtype(cifar_like):
    x, y = cifar_like
    for name in ["label-flip", "backdoor", "corrupted-source", "dba"]:
        x_out, y_out = build(name).poison_data(x.astype(np.float64), y.astype(np.int32), num_classes=NUM_CLASSES,
                                               image_shape=(3, 32, 32), rng=np.random.default_rng(0))
        assert x_out.dtype == np.float64 and y_out.dtype == np.int32, name
    x_test, y_test = build("backdoor").triggered_testset(x.astype(np.float64), y.astype(np.int32), image_shape=(3, 32, 32))
    assert x_test.dtype == np.float64 and y_test.dtype == np.int32


def test_channels_last_images_are_refused_not_guessed(cifar_like):
    x, y = cifar_like
    hwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))     # (N, 32, 32, 3): same size, wrong axes
    with pytest.raises(ValueError, match=r"backdoor: image_shape \(3, 32, 32\) does not match samples of shape \(32, 32, 3\)"):
        poison("backdoor", hwc, y, image_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"label-flip: image_shape must be \(C, H, W\) or \(H, W\)"):
        poison("label-flip", x, y, image_shape=(3, 32, 32, 1))


def test_non_image_samples_of_any_shape_get_the_trigger_on_their_last_features():
    x = np.zeros((10, 4, 5), dtype=np.float32)
    y = np.arange(10, dtype=np.int64)
    x_out, _, rows = poison("backdoor", x, y, image_shape=None, size=2, value=2.0, fraction=0.5)
    changed = np.flatnonzero((x_out != x).reshape(10, -1).any(axis=0))
    np.testing.assert_array_equal(changed, np.arange(16, 20))
    assert x_out.shape == x.shape


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 6), parts_seed=st.integers(0, 10_000), channels=st.integers(1, 3),
       extra=st.integers(0, 4), image=st.booleans())
def test_local_triggers_are_disjoint_and_their_union_is_the_global_trigger(size, parts_seed, channels, extra, image):
    parts = 1 + parts_seed % (size * size)
    side = size + extra
    shape, layout = ((channels, side, side), (channels, side, side)) if image else ((channels * side * side,), None)
    full = set(Trigger(size).feature_indices(shape, layout).tolist())
    pieces = [set(t.feature_indices(shape, layout).tolist()) for t in Trigger(size).split(parts)]
    assert all(pieces) and sum(len(p) for p in pieces) == len(full)
    assert set().union(*pieces) == full
