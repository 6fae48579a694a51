"""Fang et al. 2020's full-knowledge attacks: Krum selects the crafted update; against trimmed mean
the crafted values sit beyond the honest extremes and drag the aggregate further than a sign flip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import aggregators
from simulations.attacks import build
from simulations.attacks.fang import deviation_direction, krum_lambda_upper_bound


def honest_stack(h: int = 8, d: int = 40, seed: int = 0, dtype=torch.float64, drift: float = 1.0) -> torch.Tensor:
    """Heterogeneous honest updates: a shared drift plus per-client spread of varying size."""
    g = torch.Generator().manual_seed(seed)
    drift = drift * torch.randn(d, generator=g, dtype=torch.float64)
    spread = torch.linspace(0.3, 1.0, h, dtype=torch.float64)[:, None]
    return (drift + spread * torch.randn(h, d, generator=g, dtype=torch.float64)).to(dtype)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Krum -------------------------------------------------------------------------------------------
#
# The paper's condition for Krum to pick the crafted update: honest updates spread out around a
# small mean, as stochastic non-IID updates are (their pairwise distances comparable to their
# norms). ``noisy`` stacks have that; a tight cluster far from the origin does not (last test).


def noisy(h: int = 8, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return honest_stack(h=h, seed=seed, dtype=dtype, drift=0.3)


def brute_force_upper_bound(honest: torch.Tensor, c: int) -> float:
    """Theorem 1 of the paper written out with loops, as a reference."""
    h, d = honest.shape
    m = h + c
    sums = []
    for i in range(h):
        distances = sorted(float((honest[l] - honest[i]).norm()) for l in range(h) if l != i)
        sums.append(sum(distances[: m - c - 2]))
    return min(sums) / ((m - 2 * c - 1) * math.sqrt(d)) + max(float(g.norm()) for g in honest) / math.sqrt(d)


@pytest.mark.parametrize("h, c", [(8, 3), (12, 2), (6, 1)])
def test_krum_lambda_upper_bound_is_the_papers_formula(h, c):
    honest = honest_stack(h=h, seed=h)
    assert krum_lambda_upper_bound(honest, c) == pytest.approx(brute_force_upper_bound(honest, c), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("h, c", [(8, 3), (12, 4), (7, 2)])
def test_krum_selects_the_crafted_update_and_it_points_against_the_benign_direction(seed, h, c):
    honest = noisy(h=h, seed=seed)
    rule = aggregators.build("krum", num_byzantine=c)
    attack = build("fang-krum")
    crafted = attack.craft(honest, c, aggregator=rule, generator=generator())
    result = rule(torch.cat([honest, crafted]))
    assert attack.last_selected is True
    assert bool(result.selected[h:].any()) and not bool(result.selected[:h].any())
    torch.testing.assert_close(result.vector, crafted[0])
    s = deviation_direction(honest)
    torch.testing.assert_close(crafted[0], -attack.last_lambda * s)
    assert attack.last_lambda > 0 and bool((result.vector * s < 0).all())
    # lambda is the largest on the halving grid from the paper's bound that Krum still selects.
    upper = krum_lambda_upper_bound(honest, c)
    steps = math.log2(upper / attack.last_lambda)
    assert steps == pytest.approx(round(steps), abs=1e-9)
    if attack.last_lambda < upper:
        doubled = (-2 * attack.last_lambda * s).expand(c, -1)
        assert not bool(rule(torch.cat([honest, doubled])).selected[h:].any())


def test_the_crafted_update_moves_krum_against_the_benign_direction_more_than_no_attack():
    honest = noisy(h=9, seed=3)
    rule = aggregators.build("krum", num_byzantine=3)
    s = deviation_direction(honest)
    attacked = rule(torch.cat([honest, build("fang-krum").craft(honest, 3, aggregator=rule)])).vector
    clean_like = rule(torch.cat([honest, honest[:3]])).vector  # the attackers behaving honestly
    assert float(attacked @ s) < 0 < float(clean_like @ s)


@pytest.mark.parametrize("seed", range(4))
def test_multi_krum_averages_the_crafted_updates_in(seed):
    honest = noisy(h=10, seed=seed)
    rule = aggregators.build("multi-krum", num_byzantine=3)
    attack = build("fang-krum")
    crafted = attack.craft(honest, 3, aggregator=rule)
    result = rule(torch.cat([honest, crafted]))
    assert attack.last_selected is True and bool(result.selected[10:].all())


def test_without_an_aggregator_the_attack_searches_against_the_papers_krum():
    honest = noisy(h=8, seed=1)
    crafted = build("fang-krum").craft(honest, 3)
    torch.testing.assert_close(crafted, build("fang-krum").craft(honest, 3, aggregator=aggregators.build("krum", num_byzantine=3)))
    # Where Krum with f = c is undefined (m <= 2c + 2) the bound itself is sent.
    attack = build("fang-krum")
    crafted = attack.craft(honest_stack(h=4), 3)
    assert attack.last_selected is None
    assert attack.last_lambda == pytest.approx(krum_lambda_upper_bound(honest_stack(h=4), 3))


def test_supporters_sit_epsilon_from_the_first_crafted_update():
    honest = noisy(h=10, seed=2)
    attack = build("fang-krum", epsilon=1e-3)
    crafted = attack.craft(honest, 4, aggregator=aggregators.build("krum", num_byzantine=4), generator=generator(5))
    distances = (crafted[1:] - crafted[0]).norm(dim=1)
    torch.testing.assert_close(distances, torch.full((3,), 1e-3, dtype=torch.float64))
    assert attack.last_selected is True


def test_when_no_lambda_is_selected_the_attack_says_so():
    """A tight honest cluster far from the origin: every crafted row near -lambda*s is far from it."""
    honest = 100.0 + 0.01 * honest_stack(h=8, seed=0)
    attack = build("fang-krum")
    attack.craft(honest, 3, aggregator=aggregators.build("krum", num_byzantine=3))
    assert attack.last_selected is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fang_krum_keeps_dtype(dtype):
    honest = noisy(dtype=dtype)
    crafted = build("fang-krum").craft(honest, 2, aggregator=aggregators.build("krum", num_byzantine=2))
    assert crafted.dtype == dtype and crafted.shape == (2, 40)


# --- trimmed mean / median ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("b", [2.0, 3.5])
def test_trimmed_mean_crafted_values_lie_beyond_the_honest_extremes_against_the_mean_sign(seed, b):
    honest = honest_stack(h=9, seed=seed)
    crafted = build("fang-trimmed-mean", b=b).craft(honest, 4, generator=generator(seed))
    s = deviation_direction(honest)
    top, bottom = honest.max(dim=0).values, honest.min(dim=0).values
    up, down = s < 0, s > 0
    assert bool((crafted[:, up] >= top[up]).all()) and bool((crafted[:, down] <= bottom[down]).all())
    # ... and within the paper's factor-b range beyond the extreme.
    far_top = torch.where(top > 0, top * b, top / b)
    far_bottom = torch.where(bottom > 0, bottom / b, bottom * b)
    assert bool((crafted[:, up] <= far_top[up]).all()) and bool((crafted[:, down] >= far_bottom[down]).all())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rule_name", ["trimmed-mean", "median"])
def test_the_aggregate_moves_against_the_benign_direction_more_than_under_a_sign_flip(seed, rule_name):
    """Same count of attackers: Fang's values against the attackers' own updates sign-flipped."""
    everyone = honest_stack(h=13, seed=seed)
    honest, own = everyone[:10], everyone[10:]
    rule = aggregators.build(rule_name, num_byzantine=3)
    s = deviation_direction(honest)
    fang = rule(torch.cat([honest, build("fang-trimmed-mean").craft(honest, 3, generator=generator(seed))])).vector
    flipped = rule(torch.cat([honest, -own])).vector
    clean = rule(torch.cat([honest, own])).vector
    assert float(fang @ s) < float(flipped @ s) < float(clean @ s)


def test_zero_mean_coordinates_get_the_honest_mean():
    honest = torch.tensor([[1.0, -2.0], [-1.0, 4.0]], dtype=torch.float64)  # mean (0, 1)
    crafted = build("fang-trimmed-mean").craft(honest, 2, generator=generator())
    assert torch.equal(crafted[:, 0], torch.zeros(2, dtype=torch.float64))
    assert bool((crafted[:, 1] <= -2.0).all()) and bool((crafted[:, 1] >= -4.0).all())


def test_fang_trimmed_mean_is_reproducible_from_the_generator_and_keeps_dtype():
    honest = honest_stack(dtype=torch.float32)
    attack = build("fang-trimmed-mean")
    first = attack.craft(honest, 3, generator=generator(1))
    assert first.dtype == torch.float32
    assert torch.equal(attack.craft(honest, 3, generator=generator(1)), first)
    assert not torch.equal(attack.craft(honest, 3, generator=generator(2)), first)
    assert np.isfinite(first.numpy()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["fang-krum", "fang-trimmed-mean"])
def test_crafted_rows_stay_on_the_honest_device(name):
    honest = noisy(h=10).float().cuda()
    crafted = build(name).craft(honest, 3, aggregator=aggregators.build("krum", num_byzantine=3), generator=generator())
    assert crafted.device == honest.device and crafted.dtype == torch.float32
