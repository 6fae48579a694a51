"""Omniscient attacks: each crafted update's defining relation to the honest updates."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import norm

from simulations.attacks import build
from simulations.attacks.adaptive import damage
from simulations.attacks.omniscient import alie_z

OMNISCIENT = ["alie", "ipm", "min-max", "min-sum", "mimic", "alie-adaptive", "ipm-adaptive"]


def honest_stack(h: int = 8, d: int = 30, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Heterogeneous honest updates: a shared drift plus per-client spread of varying size."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(d, generator=g, dtype=torch.float64)
    spread = torch.linspace(0.5, 2.0, h, dtype=torch.float64)[:, None]
    return (drift + spread * torch.randn(h, d, generator=g, dtype=torch.float64)).to(dtype)


def median_rule(updates: torch.Tensor) -> SimpleNamespace:
    """A plain coordinate-wise median with the aggregator API's ``.vector``."""
    return SimpleNamespace(vector=updates.median(dim=0).values)


# --- shape, dtype, device, input checks ------------------------------------------------------------


@pytest.mark.parametrize("name", OMNISCIENT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_crafted_rows_have_the_honest_dtype_and_width(name, dtype):
    honest = honest_stack(dtype=dtype)
    crafted = build(name).craft(honest, 3, aggregator=median_rule)
    assert crafted.shape == (3, honest.shape[1]) and crafted.dtype == dtype
    assert torch.isfinite(crafted).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", OMNISCIENT)
def test_crafted_rows_stay_on_the_honest_device(name):
    honest = honest_stack(dtype=torch.float32).cuda()
    assert build(name).craft(honest, 2, aggregator=median_rule).device == honest.device


@pytest.mark.parametrize("name", OMNISCIENT)
def test_craft_refuses_bad_inputs(name):
    attack = build(name)
    with pytest.raises(ValueError, match=f"{name}: num_malicious must be a positive int"):
        attack.craft(honest_stack(), 0)
    bad = honest_stack()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"{name}: honest rows \[2\] contain NaN"):
        attack.craft(bad, 1)
    with pytest.raises(ValueError, match="non-empty"):
        attack.craft(torch.zeros(0, 4), 1)


# --- ALIE -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, f", [(10, 2), (50, 12), (7, 3), (20, 1)])
def test_alie_z_follows_the_paper_formula(n, f):
    s = np.floor(n / 2 + 1) - f
    assert alie_z(n, f) == pytest.approx(norm.ppf((n - s) / n), abs=1e-9)


def test_alie_z_for_ten_clients_two_attackers():
    assert alie_z(10, 2) == pytest.approx(0.2533471, abs=1e-6)  # s = 4, z = Phi^-1(0.6)


def test_alie_z_is_clamped_when_attackers_are_a_majority():
    # f = 7 of n = 10: s = 6 - 7 < 1 is clamped to 1, z = Phi^-1(9/10).
    assert alie_z(10, 7) == pytest.approx(norm.ppf(0.9))
    with pytest.raises(ValueError, match="alie"):
        alie_z(5, 5)


def test_alie_rows_sit_at_mean_minus_z_std_with_the_formula_z():
    honest = honest_stack(h=8)
    crafted = build("alie").craft(honest, 2)
    expected = honest.mean(dim=0) - alie_z(10, 2) * honest.std(dim=0)
    for row in crafted:
        torch.testing.assert_close(row, expected)


def test_alie_with_explicit_z():
    honest = honest_stack()
    crafted = build("alie", z=1.5).craft(honest, 4)
    torch.testing.assert_close(crafted, (honest.mean(0) - 1.5 * honest.std(0)).expand(4, -1))


def test_alie_with_one_honest_update_sends_it():
    honest = honest_stack(h=1)
    torch.testing.assert_close(build("alie").craft(honest, 1), honest)


# --- IPM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.1, 2.0])
def test_ipm_rows_are_minus_epsilon_times_the_honest_mean(epsilon):
    honest = honest_stack()
    crafted = build("ipm", epsilon=epsilon).craft(honest, 3)
    torch.testing.assert_close(crafted, (-epsilon * honest.mean(0)).expand(3, -1))


def test_ipm_default_epsilon_is_a_tenth():
    honest = honest_stack()
    torch.testing.assert_close(build("ipm").craft(honest, 1)[0], -0.1 * honest.mean(0))


# --- min-max and min-sum ----------------------------------------------------------------------------


def direction(honest: torch.Tensor, perturbation: str) -> torch.Tensor:
    mean = honest.mean(0)
    return {"std": -honest.std(0), "sign": -torch.sign(mean), "unit-vec": -mean / mean.norm()}[perturbation]


def min_max_objective(row: torch.Tensor, honest: torch.Tensor) -> float:
    return float((row - honest).norm(dim=1).max())


def min_sum_objective(row: torch.Tensor, honest: torch.Tensor) -> float:
    return float(((row - honest) ** 2).sum())


def honest_max_distance(honest: torch.Tensor) -> float:
    return float((honest[:, None, :] - honest[None, :, :]).norm(dim=2).max())


def honest_max_sum(honest: torch.Tensor) -> float:
    return float(((honest[:, None, :] - honest[None, :, :]) ** 2).sum(dim=(1, 2)).max())


@pytest.mark.parametrize("perturbation", ["std", "sign", "unit-vec"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_max_stays_within_the_honest_max_distance_with_maximal_gamma(perturbation, seed):
    honest = honest_stack(h=7, seed=seed)
    attack = build("min-max", perturbation=perturbation)
    crafted = attack.craft(honest, 3)
    gamma = attack.gamma(honest)
    p, mean = direction(honest, perturbation), honest.mean(0)
    for row in crafted:
        torch.testing.assert_close(row, mean + gamma * p)
    threshold = honest_max_distance(honest)
    assert min_max_objective(crafted[0], honest) <= threshold * (1 + 1e-12)
    # Maximal up to the relative search tolerance: a slightly larger push breaks the bound.
    assert gamma > 0
    assert min_max_objective(mean + gamma * (1 + 2 * attack.tolerance) * p, honest) > threshold


@pytest.mark.parametrize("perturbation", ["std", "sign", "unit-vec"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_sum_stays_within_the_honest_max_sum_with_maximal_gamma(perturbation, seed):
    honest = honest_stack(h=7, seed=seed)
    attack = build("min-sum", perturbation=perturbation)
    crafted = attack.craft(honest, 2)
    gamma = attack.gamma(honest)
    p, mean = direction(honest, perturbation), honest.mean(0)
    torch.testing.assert_close(crafted[1], mean + gamma * p)
    threshold = honest_max_sum(honest)
    assert min_sum_objective(crafted[0], honest) <= threshold * (1 + 1e-12)
    assert min_sum_objective(mean + gamma * (1 + 2 * attack.tolerance) * p, honest) > threshold
    # The sum of squares is quadratic in gamma with no linear term (sum_i (mean - g_i) = 0):
    # the bound has the closed form gamma* = sqrt((T - S) / (h ||p||^2)).
    spread = min_sum_objective(mean, honest)
    exact = np.sqrt((threshold - spread) / (honest.shape[0] * float(p @ p)))
    assert gamma == pytest.approx(exact, rel=2 * attack.tolerance)


def test_min_max_gamma_search_handles_tiny_and_huge_scales():
    for scale in (1e-6, 1e4):
        honest = honest_stack(seed=4) * scale
        attack = build("min-max", perturbation="unit-vec")
        gamma = attack.gamma(honest)
        p, mean = direction(honest, "unit-vec"), honest.mean(0)
        threshold = honest_max_distance(honest)
        assert min_max_objective(mean + gamma * p, honest) <= threshold * (1 + 1e-12)
        assert min_max_objective(mean + gamma * (1 + 2 * attack.tolerance) * p, honest) > threshold


def test_min_max_with_identical_honest_updates_sends_them():
    honest = torch.ones(4, 6)
    torch.testing.assert_close(build("min-max").craft(honest, 2), torch.ones(2, 6))
    torch.testing.assert_close(build("min-sum", perturbation="sign").craft(honest, 1), torch.ones(1, 6))


# --- mimic ----------------------------------------------------------------------------------------


def test_mimic_copies_an_honest_update():
    honest = honest_stack()
    crafted = build("mimic").craft(honest, 3)
    matches = [i for i in range(len(honest)) if torch.equal(crafted[0], honest[i])]
    assert len(matches) == 1
    assert all(torch.equal(row, crafted[0]) for row in crafted)


def test_mimic_copies_the_client_furthest_along_the_direction_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    honest = 0.01 * torch.randn(6, 20, generator=g, dtype=torch.float64)
    honest[:, 0] += torch.tensor([1.0, -1.0, 1.5, -4.0, 0.5, 2.0], dtype=torch.float64)  # client 3 is furthest on e_0
    attack = build("mimic")
    assert attack.victim(honest) == 3
    torch.testing.assert_close(attack.craft(honest, 2), honest[3].expand(2, -1))


def test_mimic_with_an_explicit_index():
    honest = honest_stack()
    torch.testing.assert_close(build("mimic", index=5).craft(honest, 2), honest[5].expand(2, -1))
    with pytest.raises(ValueError, match="mimic: index=8 but there are only 8 honest updates"):
        build("mimic", index=8).craft(honest, 1)


# --- adaptive variants ------------------------------------------------------------------------------


def rules():
    """The rules the adaptive attacks are tested against: the project's, and a plain median."""
    import aggregators

    return {
        "median": aggregators.build("median"),
        "trimmed-mean": aggregators.build("trimmed-mean", num_byzantine=3),
        "plain-median": median_rule,
    }


@pytest.mark.parametrize("adaptive, fixed", [("alie-adaptive", "alie"), ("ipm-adaptive", "ipm")])
@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "plain-median"])
def test_adaptive_variants_do_at_least_as_much_damage_as_the_fixed_attack(adaptive, fixed, rule):
    aggregator = rules()[rule]
    for seed in range(3):
        honest = honest_stack(h=9, seed=seed)
        fixed_damage = damage(honest, build(fixed).craft(honest, 3), aggregator)
        adaptive_damage = damage(honest, build(adaptive).craft(honest, 3, aggregator=aggregator), aggregator)
        assert adaptive_damage >= fixed_damage


def test_adaptive_alie_picks_the_most_damaging_z_of_its_grid():
    honest, aggregator = honest_stack(h=9), rules()["median"]
    attack = build("alie-adaptive", steps=11, z_grid_max=3.0)
    crafted = attack.craft(honest, 3, aggregator=aggregator)
    torch.testing.assert_close(crafted, build("alie", z=attack.last_z).craft(honest, 3))
    best = damage(honest, crafted, aggregator)
    for z in np.linspace(0.0, 3.0, 11):
        assert damage(honest, build("alie", z=z).craft(honest, 3), aggregator) <= best


def test_adaptive_ipm_beats_the_fixed_epsilon_against_the_median():
    honest, aggregator = honest_stack(h=9), rules()["median"]
    attack = build("ipm-adaptive")
    crafted = attack.craft(honest, 3, aggregator=aggregator)
    torch.testing.assert_close(crafted, build("ipm", epsilon=attack.last_epsilon).craft(honest, 3))
    assert attack.last_epsilon != 0.1
    assert damage(honest, crafted, aggregator) > damage(honest, build("ipm").craft(honest, 3), aggregator)
    for epsilon in np.geomspace(0.01, 10.0, 25):
        assert damage(honest, build("ipm", epsilon=epsilon).craft(honest, 3), aggregator) <= damage(honest, crafted, aggregator)


@pytest.mark.parametrize("adaptive, fixed", [("alie-adaptive", "alie"), ("ipm-adaptive", "ipm")])
def test_adaptive_variants_fall_back_to_the_fixed_formula_without_an_aggregator(adaptive, fixed):
    honest = honest_stack()
    torch.testing.assert_close(build(adaptive).craft(honest, 2), build(fixed).craft(honest, 2))
