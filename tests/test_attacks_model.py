"""Non-omniscient model poisoning: what a malicious client does to its own update."""

from __future__ import annotations

import pytest
import torch

from simulations.attacks import build


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def update():
    return torch.randn(1000, generator=generator(0))


def test_sign_flip_defaults_to_plain_negation(update):
    torch.testing.assert_close(build("sign-flip").poison_update(update, rng=generator(1)), -update)


@pytest.mark.parametrize("scale", [0.5, 10.0])
def test_sign_flip_is_minus_scale_times_the_update(update, scale):
    torch.testing.assert_close(build("sign-flip", scale=scale).poison_update(update, rng=generator(1)), -scale * update)


def test_scaling_defaults_to_ten_times_the_update(update):
    torch.testing.assert_close(build("scaling").poison_update(update, rng=generator(1)), 10.0 * update)
    torch.testing.assert_close(build("scaling", scale=3).poison_update(update, rng=generator(1)), 3.0 * update)


def test_backdoor_boost_is_model_replacement_scaling(update):
    torch.testing.assert_close(build("backdoor", boost=5).poison_update(update, rng=generator(1)), 5.0 * update)
    assert build("backdoor").poison_update(update, rng=generator(1)) is update


@pytest.mark.parametrize("std", [1.0, 2.5])
def test_gaussian_replaces_the_update_by_centred_noise_of_the_given_std(std):
    update = torch.full((40_000,), 7.0)
    noise = build("gaussian", std=std).poison_update(update, rng=generator(3))
    # The sample std of 40k draws is within ~0.4% of std (one sigma); 3% is many sigmas.
    assert abs(float(noise.std()) / std - 1.0) < 0.03
    assert abs(float(noise.mean())) < 0.05 * std
    assert abs(float(noise.mean()) - 7.0) > 1.0  # the honest update is gone, not perturbed


def test_gaussian_is_reproducible_from_the_generator_and_ignores_the_update_values():
    attack = build("gaussian")
    first = attack.poison_update(torch.zeros(50), rng=generator(4))
    torch.testing.assert_close(attack.poison_update(torch.ones(50), rng=generator(4)), first)
    assert not torch.equal(attack.poison_update(torch.zeros(50), rng=generator(5)), first)


def test_gaussian_std_zero_sends_zeros():
    assert torch.equal(build("gaussian", std=0).poison_update(torch.ones(5), rng=generator(0)), torch.zeros(5))


@pytest.mark.parametrize("name", ["sign-flip", "scaling", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_attacks_keep_shape_and_dtype(name, dtype):
    update = torch.randn(17, dtype=dtype, generator=generator(0))
    out = build(name).poison_update(update, rng=generator(2))
    assert out.shape == update.shape and out.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sign-flip", "scaling", "gaussian"])
def test_update_attacks_stay_on_the_update_device(name):
    update = torch.randn(17, device="cuda")
    assert build(name).poison_update(update, rng=generator(2)).device == update.device


def test_non_float_updates_are_refused():
    with pytest.raises(ValueError, match="sign-flip: update must be a floating torch.Tensor"):
        build("sign-flip").poison_update(torch.arange(3), rng=generator(0))
