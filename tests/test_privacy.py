"""Specification of server.privacy: clipping, noise calibration, adaptive clipping and accounting."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from server.privacy import (
    AdaptiveClipper,
    DPConfigError,
    PrivacyAccountant,
    central_noise_std,
    clip_update,
    clip_updates,
    epsilon_for,
    gaussian_noise_like,
    local_noise_std,
    privatize_update,
    update_norms,
)


class MeanRule:
    """A plain mean that bounds its replace-one sensitivity, like the aggregators package's mean."""

    name = "mean"

    def __call__(self, updates: torch.Tensor) -> torch.Tensor:
        return updates.mean(dim=0)

    def sensitivity(self, clip_norm: float, n: int) -> float:
        return 2.0 * clip_norm / n


class NoBoundRule:
    """A rule that cannot say how far one client moves its output."""

    name = "geometric-median"

    def __call__(self, updates: torch.Tensor) -> torch.Tensor:
        return updates.median(dim=0).values


def reference_rdp_epsilon(q: float, sigma: float, rounds: int, delta: float) -> float:
    """dp_accounting by hand: one Poisson-sampled Gaussian event per round, default RDP orders."""
    ledger = RdpAccountant()
    ledger.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    return ledger.get_epsilon(delta)


# ---------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "sigma", "rounds", "delta"),
    [(0.1, 1.0, 50, 1e-5), (0.3, 1.5, 20, 1e-6), (1.0, 4.0, 10, 1e-5), (0.02, 0.8, 200, 1e-5)],
)
def test_epsilon_matches_hand_built_dp_accounting(q, sigma, rounds, delta):
    expected = reference_rdp_epsilon(q, sigma, rounds, delta)
    assert epsilon_for(sigma, q, rounds, delta) == pytest.approx(expected, rel=0.01)
    accountant = PrivacyAccountant(noise_multiplier=sigma, sampling_rate=q, delta=delta)
    accountant.step(rounds)
    assert accountant.rounds == rounds
    assert accountant.epsilon() == pytest.approx(expected, rel=0.01)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    by_rounds = [epsilon_for(1.0, 0.2, rounds, 1e-5) for rounds in (1, 10, 100)]
    assert by_rounds[0] < by_rounds[1] < by_rounds[2]
    by_noise = [epsilon_for(z, 0.2, 50, 1e-5) for z in (0.7, 1.0, 2.0)]
    assert by_noise[0] > by_noise[1] > by_noise[2]
    by_rate = [epsilon_for(1.0, q, 50, 1e-5) for q in (0.05, 0.2, 1.0)]
    assert by_rate[0] < by_rate[1] < by_rate[2]


def test_pld_is_tighter_than_rdp_but_close():
    rdp = epsilon_for(1.0, 0.1, 100, 1e-5, accountant="rdp")
    pld = epsilon_for(1.0, 0.1, 100, 1e-5, accountant="pld")
    assert 0.7 * rdp < pld <= rdp


def test_accountant_edge_cases_and_lookahead():
    accountant = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.1, delta=1e-5)
    assert accountant.epsilon() == 0.0
    ahead = accountant.epsilon_if_step(5)
    assert accountant.rounds == 0  # looking ahead spends nothing
    accountant.step()
    accountant.step(4)
    assert accountant.epsilon() == pytest.approx(ahead)
    assert accountant.epsilon_if_step() > accountant.epsilon()

    noiseless = PrivacyAccountant(noise_multiplier=0.0, sampling_rate=0.5, delta=1e-5)
    assert noiseless.epsilon() == 0.0
    noiseless.step()
    assert noiseless.epsilon() == math.inf


def test_client_mode_is_composed_gaussian_mechanism():
    # dp=client: q = 1 per participation, so k participations compose k plain Gaussian mechanisms.
    # k Gaussians with multiplier z are one Gaussian with multiplier z / sqrt(k).
    accountant = PrivacyAccountant(noise_multiplier=3.0, sampling_rate=1.0, delta=1e-5)
    accountant.step(9)
    assert accountant.epsilon() == pytest.approx(epsilon_for(1.0, 1.0, 1, 1e-5), rel=1e-6)


def test_accountant_state_roundtrip_and_refuses_other_parameters():
    accountant = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.25, delta=1e-5, accountant="pld")
    accountant.step(7)
    state = json.loads(json.dumps(accountant.state_dict()))
    resumed = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.25, delta=1e-5, accountant="pld")
    resumed.load_state_dict(state)
    assert resumed.rounds == 7
    assert resumed.epsilon() == pytest.approx(accountant.epsilon())
    other = PrivacyAccountant(noise_multiplier=2.0, sampling_rate=0.25, delta=1e-5, accountant="pld")
    with pytest.raises(ValueError, match="noise_multiplier"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": -1.0, "sampling_rate": 0.1, "delta": 1e-5}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.0, "delta": 1e-5}, "sampling_rate"),
        ({"noise_multiplier": 1.0, "sampling_rate": 1.5, "delta": 1e-5}, "sampling_rate"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "delta": 0.0}, "delta"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "delta": 1.0}, "delta"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "delta": 1e-5, "accountant": "moments"}, "accountant"),
    ],
)
def test_accountant_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrivacyAccountant(**kwargs)


def test_epsilon_for_rejects_negative_rounds():
    with pytest.raises(ValueError, match="rounds"):
        epsilon_for(1.0, 0.1, -1, 1e-5)


# ---------------------------------------------------------------------------------------------------
# Noise calibration
# ---------------------------------------------------------------------------------------------------


def test_central_noise_has_the_calibrated_std():
    clip, n, z = 0.5, 8, 1.3
    rule = MeanRule()
    std = central_noise_std(rule, clip_norm=clip, num_clients=n, noise_multiplier=z)
    assert std == pytest.approx(z * 2 * clip / n)

    generator = torch.Generator().manual_seed(0)
    updates, _ = clip_updates(torch.randn(n, 100_000, generator=generator), clip)
    aggregate = rule(updates)
    for _ in range(4):
        released = aggregate + gaussian_noise_like(aggregate, std, generator)
        noise = released - aggregate
        assert noise.mean().abs().item() < 5 * std / math.sqrt(noise.numel())
        assert noise.std().item() == pytest.approx(std, rel=0.05)


def test_noise_follows_vector_dtype_and_is_reproducible():
    vector = torch.zeros(1000, dtype=torch.float64)
    first = gaussian_noise_like(vector, 2.0, torch.Generator().manual_seed(3))
    second = gaussian_noise_like(vector, 2.0, torch.Generator().manual_seed(3))
    assert first.dtype == torch.float64 and torch.equal(first, second)
    assert torch.count_nonzero(gaussian_noise_like(vector, 0.0)) == 0
    with pytest.raises(ValueError, match="std"):
        gaussian_noise_like(vector, -1.0)


def test_central_noise_std_refuses_a_rule_without_sensitivity():
    with pytest.raises(DPConfigError, match="dp=client") as error:
        central_noise_std(NoBoundRule(), clip_norm=1.0, num_clients=10, noise_multiplier=1.0)
    assert "geometric-median" in str(error.value)
    assert isinstance(error.value, ValueError)


def test_client_noise_uses_replace_one_sensitivity_of_one_update():
    clip, z = 0.25, 2.0
    assert local_noise_std(clip_norm=clip, noise_multiplier=z) == pytest.approx(2 * z * clip)
    update = torch.full((200_000,), 1.0)  # norm ~447, clipped to 0.25
    released = privatize_update(update, clip_norm=clip, noise_multiplier=z, generator=torch.Generator().manual_seed(1))
    noise = released - clip_update(update, clip)
    assert noise.std().item() == pytest.approx(2 * z * clip, rel=0.05)


# ---------------------------------------------------------------------------------------------------
# Clipping
# ---------------------------------------------------------------------------------------------------

row_scales = st.sampled_from([0.0, 1e-30, 1e-6, 1.0, 1e3, 1e30])


@settings(max_examples=60, deadline=None)
@given(
    scales=st.lists(row_scales, min_size=1, max_size=6),
    d=st.integers(min_value=1, max_value=300),
    clip_norm=st.floats(min_value=1e-4, max_value=1e4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_clipped_norms_never_exceed_clip_norm(scales, d, clip_norm, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    updates = torch.randn(len(scales), d, generator=generator, dtype=torch.float64)
    updates = (updates * torch.tensor(scales, dtype=torch.float64)[:, None]).to(dtype)
    clipped, norms = clip_updates(updates, clip_norm)

    assert clipped.dtype == dtype and clipped.shape == updates.shape
    assert torch.isfinite(clipped).all()
    assert (update_norms(clipped) <= clip_norm).all()
    assert torch.equal(norms, update_norms(updates))
    unclipped = norms <= clip_norm
    assert torch.equal(clipped[unclipped], updates[unclipped])  # rows within the ball are untouched
    # Clipped rows keep their direction and land just under the clip norm.
    over = ~unclipped
    if over.any():
        assert update_norms(clipped[over]).min() >= clip_norm * (1 - 1e-5)
        for original, scaled in zip(updates[over].double(), clipped[over].double()):
            factor = update_norms(scaled[None])[0] / update_norms(original[None])[0]
            assert torch.allclose(scaled, original * factor, rtol=1e-5, atol=clip_norm * 1e-6)


def test_zero_update_is_unchanged_and_finite():
    zero = torch.zeros(3, 50)
    clipped, norms = clip_updates(zero, 1.0)
    assert torch.equal(clipped, zero) and torch.equal(norms, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(clip_update(torch.zeros(7), 0.1), torch.zeros(7))


def test_non_finite_rows_are_named():
    updates = torch.ones(4, 10)
    updates[1, 3] = math.nan
    updates[3, 0] = math.inf
    with pytest.raises(ValueError, match=r"rows \[1, 3\]"):
        clip_updates(updates, 1.0)


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, math.inf, math.nan])
def test_clip_norm_must_be_positive_and_finite(clip_norm):
    with pytest.raises(ValueError, match="clip_norm"):
        clip_updates(torch.ones(2, 3), clip_norm)


def test_norms_are_accurate_in_float64_for_float32_input():
    # Many equal float32 entries: float32 accumulation drifts, the float64 blocks do not.
    d = 3_000_000
    updates = torch.full((2, d), 0.1, dtype=torch.float32)
    exact = math.sqrt(d) * float(np.float32(0.1))
    norms = update_norms(updates)
    assert norms.dtype == torch.float64
    assert norms[0].item() == pytest.approx(exact, rel=1e-12)
    big = torch.tensor([[1e200, 1e200], [1e-200, 1e-200]], dtype=torch.float64)
    assert update_norms(big).tolist() == pytest.approx([math.sqrt(2) * 1e200, math.sqrt(2) * 1e-200], rel=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clipping_and_noise_stay_on_cuda():
    updates = torch.randn(5, 1000, device="cuda") * 10
    clipped, norms = clip_updates(updates, 1.0)
    assert clipped.device == updates.device and norms.device == updates.device
    assert (update_norms(clipped) <= 1.0).all()
    noise = gaussian_noise_like(clipped[0], 1.0, torch.Generator().manual_seed(0))
    assert noise.device == updates.device


# ---------------------------------------------------------------------------------------------------
# Adaptive clipping
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("initial_clip", [1.0, 25.0])
@pytest.mark.parametrize("count_noise", [0.0, 0.5])
def test_adaptive_clip_converges_to_the_median_norm(initial_clip, count_noise):
    clipper = AdaptiveClipper(initial_clip, target_quantile=0.5, learning_rate=0.2,
                              count_noise_multiplier=count_noise, seed=0)
    norms = torch.full((100,), 5.0, dtype=torch.float64)
    trajectory = [clipper.update(norms) for _ in range(80)]
    # It moves monotonically towards 5 at first: by at most exp(0.1) a round without noise.
    assert abs(math.log(trajectory[5] / 5)) < abs(math.log(initial_clip / 5))
    # Once there it stays within a step or two of 5.
    tail = np.log(np.array(trajectory[-30:]) / 5)
    assert np.abs(tail).max() < 0.25
    assert clipper.clip_norm == trajectory[-1]


def test_adaptive_clip_state_roundtrip_continues_identically():
    clipper = AdaptiveClipper(2.0, count_noise_multiplier=1.0, seed=42)
    norms = torch.linspace(0.1, 10.0, 20, dtype=torch.float64)
    for _ in range(5):
        clipper.update(norms)
    state = json.loads(json.dumps(clipper.state_dict()))
    resumed = AdaptiveClipper(2.0, count_noise_multiplier=1.0, seed=7)
    resumed.load_state_dict(state)
    assert resumed.clip_norm == clipper.clip_norm and resumed.rounds == 5
    assert [resumed.update(norms) for _ in range(5)] == [clipper.update(norms) for _ in range(5)]
    with pytest.raises(ValueError, match="target_quantile"):
        AdaptiveClipper(2.0, target_quantile=0.9, count_noise_multiplier=1.0).load_state_dict(state)


def test_effective_noise_multiplier_keeps_the_total_cost():
    z, sigma_b = 1.0, 5.0
    clipper = AdaptiveClipper(1.0, count_noise_multiplier=sigma_b)
    z_update = clipper.effective_noise_multiplier(z)
    assert z_update > z
    # Update and count together are one Gaussian mechanism of multiplier z (count sensitivity 1).
    assert z_update**-2 + sigma_b**-2 == pytest.approx(z**-2)
    assert clipper.effective_noise_multiplier(0.0) == 0.0
    # sigma_b = n / 20 when unset: 200 clients a round give sigma_b = 10.
    default = AdaptiveClipper(1.0)
    assert default.effective_noise_multiplier(z, num_clients=200) == pytest.approx((1 - 0.01) ** -0.5)


def test_effective_noise_multiplier_refuses_too_little_count_noise():
    with pytest.raises(DPConfigError, match="count_noise_multiplier"):
        AdaptiveClipper(1.0, count_noise_multiplier=0.5).effective_noise_multiplier(1.0)
    with pytest.raises(DPConfigError):
        AdaptiveClipper(1.0).effective_noise_multiplier(1.0, num_clients=10)  # n/20 = 0.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_clip": -1.0}, "clip_norm"),
        ({"initial_clip": 1.0, "target_quantile": 1.5}, "target_quantile"),
        ({"initial_clip": 1.0, "learning_rate": 0.0}, "learning_rate"),
        ({"initial_clip": 1.0, "count_noise_multiplier": -0.1}, "count_noise_multiplier"),
    ],
)
def test_adaptive_clipper_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveClipper(**kwargs)


def test_adaptive_clipper_rejects_non_finite_norms():
    with pytest.raises(ValueError, match=r"\[1\]"):
        AdaptiveClipper(1.0, count_noise_multiplier=0.0).update(torch.tensor([1.0, math.nan]))
