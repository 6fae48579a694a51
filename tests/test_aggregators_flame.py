"""Specification of FLAME (aggregators/flame.py): the rule ``flame`` and the pre-aggregation step.

Nguyen et al., USENIX Security 2022: admit the HDBSCAN majority cluster of cosine distances,
clip to the median norm, average, add noise of std lambda * median norm.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aggregators
from aggregators.flame import FlameFilter, majority_cluster
from aggregators.similarity import cosine_similarities

FAST = settings(
    max_examples=int(os.environ.get("PHALANX_HYPOTHESIS_EXAMPLES", 25)),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def backdoor_round(seed: int, d: int = 200, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """7 honest updates spread around one direction (pairwise cosine ~0.7), then 3 near-identical
    backdoor updates along an orthogonal direction."""
    g = torch.Generator().manual_seed(seed)
    honest_direction = torch.zeros(d, dtype=torch.float64)
    honest_direction[0] = 1.0
    backdoor_direction = torch.zeros(d, dtype=torch.float64)
    backdoor_direction[1] = 1.0
    honest = honest_direction + 0.05 * torch.randn(7, d, generator=g, dtype=torch.float64)
    backdoor = 2.0 * backdoor_direction + 1e-3 * torch.randn(3, d, generator=g, dtype=torch.float64)
    return torch.cat([honest, backdoor]).to(dtype)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_admits_the_honest_majority_and_drops_the_backdoor_cluster(seed: int, dtype: torch.dtype) -> None:
    x = backdoor_round(seed, dtype=dtype)
    out = aggregators.build("flame", noise_lambda=0.0)(x)
    assert not bool(out.selected[7:].any())
    assert int(out.selected.sum()) >= 10 // 2 + 1
    assert out.scores[7:].tolist() == [1.0, 1.0, 1.0]
    assert bool((out.scores[out.selected] < 1.0).all())
    # The aggregate points the honest way: the backdoor direction (coordinate 1) is not in it.
    assert float(out.vector[0]) > 0.9 and abs(float(out.vector[1])) < 0.1


def test_clipping_bounds_every_admitted_contribution_by_the_median_norm() -> None:
    g = torch.Generator().manual_seed(0)
    direction = torch.zeros(50, dtype=torch.float64)
    direction[0] = 1.0
    # One direction, norms 1..9 (median 5 over all rows, admitted or not).
    x = torch.arange(1, 10, dtype=torch.float64)[:, None] * (direction + 0.01 * torch.randn(9, 50, generator=g, dtype=torch.float64))
    norms = x.norm(dim=1)
    median = float(norms.median())
    clipped, mixing = FlameFilter()(x)
    rows = (mixing != 0).to(torch.float64).argmax(dim=1)
    assert clipped.shape[0] >= 9 // 2 + 1
    for row, source in zip(clipped, rows.tolist()):
        if float(norms[source]) <= median:
            assert torch.equal(row, x[source])  # below the median: unchanged
        else:
            assert float(row.norm()) <= median and float(row.norm()) == pytest.approx(median, rel=1e-12)
    out = aggregators.build("flame", noise_lambda=0.0)(x)
    assert torch.equal(out.selected.nonzero().flatten(), rows.sort().values)
    assert torch.allclose(out.vector, clipped.mean(dim=0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_rows_never_exceed_the_median_after_rounding(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = (1.0 + torch.rand(11, 1000, generator=g, dtype=torch.float64)).to(dtype)
    x = x * torch.linspace(0.5, 3.0, 11, dtype=dtype)[:, None]
    clipped, _ = FlameFilter()(x)
    median = x.to(torch.float64).norm(dim=1).median()
    assert bool((clipped.to(torch.float64).norm(dim=1) <= median).all())


def test_noise_std_is_lambda_times_the_median_norm_and_seeded() -> None:
    d = 20_000
    x = torch.ones(5, d, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)[:, None]
    median = 3.0 * d**0.5
    clean = aggregators.build("flame", noise_lambda=0.0)(x).vector
    rule = aggregators.build("flame", noise_lambda=0.01, seed=7)
    noisy = rule(x).vector
    std = float((noisy - clean).std())
    assert std == pytest.approx(0.01 * median, rel=0.03)
    # Same seed, same noise; the generator advances between rounds and its state round-trips.
    again = aggregators.build("flame", noise_lambda=0.01, seed=7)
    assert torch.equal(again(x).vector, noisy)
    state = rule.state_dict()
    second = rule(x).vector
    assert not torch.equal(second, noisy)
    again.load_state_dict(state)
    assert torch.equal(again(x).vector, second)


def test_flame_in_a_pre_aggregation_chain() -> None:
    x = backdoor_round(3)
    chain = aggregators.build("trimmed-mean", num_byzantine=2, pre=["flame"])
    out = chain(x)
    assert chain.name == "flame+trimmed-mean"
    assert not bool(out.selected[7:].any())
    # Rejected clients are maximally suspicious: the chain gives them the largest row score.
    assert bool((out.scores[7:] >= out.scores[:7].max()).all())
    assert float(out.vector[0]) > 0.9 and abs(float(out.vector[1])) < 0.1
    with_weights = chain(x, weights=torch.arange(1.0, 11.0))
    assert not bool(with_weights.selected[7:].any())


# --- edge cases -----------------------------------------------------------------------------------


def test_one_row_is_refused() -> None:
    with pytest.raises(ValueError, match="flame: needs n >= 2 updates to cluster, got n=1"):
        aggregators.build("flame")(torch.ones(1, 3))
    with pytest.raises(ValueError, match="flame: needs n >= 2"):
        FlameFilter()(torch.ones(1, 3))


def test_two_rows_are_both_admitted() -> None:
    out = aggregators.build("flame", noise_lambda=0.0)(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert out.selected.tolist() == [True, True]


def test_identical_rows_are_all_admitted() -> None:
    x = torch.tensor([[1.0, -2.0, 3.0]]).repeat(6, 1)
    out = aggregators.build("flame", noise_lambda=0.0)(x)
    assert out.selected.all() and torch.equal(out.vector, x[0])
    assert out.scores.tolist() == [0.0] * 6


def test_duplicates_are_treated_alike_wherever_they_sit() -> None:
    # Ten copies of one row and two zero rows. BLAS rounds the product of a row with itself and
    # with its copies differently (cosine 1 - 1e-16 against 1); taken at face value, that made
    # HDBSCAN admit eight of the copies and reject two (this stack), depending on their position.
    g = torch.Generator().manual_seed(16)
    x = torch.randn(12, 20, generator=g)
    x[:10] = x[0].clone()
    x[10:] = 0.0
    cosine, _ = cosine_similarities(x, 1 << 20)
    assert bool((cosine[:10, :10] == 1.0).all())
    out = aggregators.build("flame", noise_lambda=0.0)(x)
    assert out.selected.tolist() == [True] * 10 + [False] * 2
    perm = torch.randperm(12, generator=g)
    assert torch.equal(aggregators.build("flame", noise_lambda=0.0)(x[perm]).selected, out.selected[perm])


def test_a_majority_made_of_two_close_groups_is_admitted_as_one() -> None:
    # Honest clients in two groups (4 and 3 rows, directions at cosine 0.8) and 3 backdoor rows.
    # Only a majority may form a cluster (min_cluster_size = n // 2 + 1 = 6): the two honest
    # groups are one cluster and the backdoor is out. With small clusters allowed, the largest
    # would be a 4-row group, no majority, and FLAME would have to admit everyone.
    g = torch.Generator().manual_seed(8)
    d = 100
    u, v, w = torch.zeros(3, d, dtype=torch.float64)
    u[0] = 1.0
    v[0], v[1] = 0.8, 0.6
    w[2] = 1.0
    noise = 0.01 * torch.randn(10, d, generator=g, dtype=torch.float64)
    x = torch.cat([u.repeat(4, 1), v.repeat(3, 1), 3.0 * w.repeat(3, 1)]) + noise
    out = aggregators.build("flame", noise_lambda=0.0)(x)
    assert not bool(out.selected[7:].any()) and int(out.selected[:7].sum()) >= 6


def test_zero_rows_are_orthogonal_to_the_rest() -> None:
    # Two zero updates next to five updates along one direction: the zeros are a minority cluster
    # (distance 0 to each other, 1 to everyone else) and are rejected.
    direction = torch.tensor([1.0, 0.0, 0.0])
    g = torch.Generator().manual_seed(2)
    x = torch.cat([direction + 0.01 * torch.randn(5, 3, generator=g), torch.zeros(2, 3)])
    out = aggregators.build("flame", noise_lambda=0.0)(x)
    assert not out.selected[5:].any() and int(out.selected.sum()) >= 7 // 2 + 1
    # A majority of zero updates is admitted and averages to zero (the median norm is 0 as well).
    many_zeros = torch.cat([direction[None, :], torch.zeros(4, 3)])
    out = aggregators.build("flame")(many_zeros)
    assert out.selected.tolist() == [False, True, True, True, True]
    assert torch.equal(out.vector, torch.zeros(3))


def test_without_a_majority_cluster_every_row_is_admitted() -> None:
    # HDBSCAN labels -1 for outliers. All outliers, or a largest cluster short of n // 2 + 1,
    # leave FLAME's premise unobservable: admit everyone.
    assert majority_cluster(np.array([-1, -1, -1, -1])).tolist() == [True] * 4
    assert majority_cluster(np.array([0, 0, 1, 1, -1])).tolist() == [True] * 5
    assert majority_cluster(np.array([0, 0, 0, 1, -1])).tolist() == [True, True, True, False, False]
    assert majority_cluster(np.array([1, 1, 0, 1, 1])).tolist() == [True, True, False, True, True]


def test_bad_parameters_are_named() -> None:
    for bad in (-0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="flame: noise_lambda must be a non-negative finite number"):
            aggregators.build("flame", noise_lambda=bad)


# --- properties -----------------------------------------------------------------------------------


def random_stack(seed: int, n: int, d: int, dtype: torch.dtype, clusters: int) -> torch.Tensor:
    """Rows around ``clusters`` random directions (clusters = 0: independent rows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if clusters:
        centres = 3.0 * torch.randn(clusters, d, generator=g, dtype=torch.float64)
        x = centres[torch.randint(clusters, (n,), generator=g)] + 0.5 * x
    return x.to(dtype)


@FAST
@given(
    n=st.integers(2, 14),
    d=st.integers(1, 30),
    clusters=st.integers(0, 3),
    copies=st.integers(0, 14),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    noise_lambda=st.sampled_from([0.0, 0.001]),
)
def test_properties_on_random_stacks(
    n: int, d: int, clusters: int, copies: int, seed: int, dtype: torch.dtype, noise_lambda: float
) -> None:
    x = random_stack(seed, n, d, dtype, clusters)
    x[1 : min(copies, n)] = x[0].clone()  # exact duplicates: equal rows must be treated alike
    out = aggregators.build("flame", noise_lambda=noise_lambda)(x)
    assert out.vector.dtype == dtype and out.vector.device == x.device and out.vector.shape == (d,)
    assert bool(torch.isfinite(out.vector).all())
    assert out.scores.dtype == torch.float64 and bool(((out.scores >= 0) & (out.scores <= 1)).all())
    assert int(out.selected.sum()) >= n // 2 + 1
    # The mean of rows clipped to the median norm cannot be longer than that norm (plus noise).
    ordered = x.to(torch.float64).norm(dim=1).sort().values
    median = float(ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    if noise_lambda == 0.0:
        assert float(out.vector.to(torch.float64).norm()) <= median * (1 + 1e-6) + 1e-12
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = aggregators.build("flame", noise_lambda=noise_lambda)(x[perm])
    assert torch.equal(shuffled.selected, out.selected[perm])
    assert torch.allclose(shuffled.scores, out.scores[perm], rtol=1e-9, atol=1e-12)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(shuffled.vector, out.vector, rtol=tol, atol=tol)


@FAST
@given(n=st.integers(2, 12), d=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_step_mixing_reproduces_its_rows(n: int, d: int, seed: int) -> None:
    x = random_stack(seed, n, d, torch.float64, 2)
    clipped, mixing = FlameFilter()(x)
    assert clipped.shape == (mixing.shape[0], d) and mixing.shape[1] == n
    assert torch.allclose(clipped, mixing @ x, rtol=1e-12, atol=1e-14)
    # One client per row, each at most once.
    assert bool(((mixing != 0).sum(dim=1) <= 1).all()) and bool(((mixing != 0).sum(dim=0) <= 1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_torch_kernels_of_other_devices_agree(dtype: torch.dtype) -> None:
    # On CUDA (or for dtypes numpy lacks) the Gram pass runs in torch: same admission, same output.
    from aggregators.blocks import portable_kernels

    x = backdoor_round(4, dtype=dtype)
    numpy_path = aggregators.build("flame")(x)
    with portable_kernels():
        torch_path = aggregators.build("flame")(x)
    assert torch.equal(torch_path.selected, numpy_path.selected) and not bool(torch_path.selected[7:].any())
    assert torch_path.vector.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert torch.allclose(torch_path.vector.double(), numpy_path.vector.double(), rtol=tol, atol=tol)
