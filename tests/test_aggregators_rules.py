"""Each rule on hand-made stacks with known answers, input validation, impossible parameters."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import aggregators
from aggregators.blocks import portable_kernels

DTYPES = [torch.float32, torch.float64]


def stack(rows: list[list[float]], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


# --- mean -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_unweighted_and_weighted(dtype: torch.dtype) -> None:
    x = stack([[0.0, 2.0], [2.0, 4.0], [4.0, 0.0]], dtype)
    rule = aggregators.build("mean")
    out = rule(x)
    assert out.vector.dtype == dtype
    assert torch.allclose(out.vector, torch.tensor([2.0, 2.0], dtype=dtype))
    weighted = rule(x, weights=torch.tensor([1.0, 0.0, 3.0]))
    assert torch.allclose(weighted.vector, torch.tensor([3.0, 0.5], dtype=dtype))
    assert weighted.selected.tolist() == [True, False, True]
    # Scores are distances to the output.
    assert torch.allclose(out.scores, torch.tensor([2.0, 2.0, 2.0 * 2**0.5], dtype=torch.float64))


def test_mean_rejects_bad_weights() -> None:
    x = torch.zeros(3, 2)
    rule = aggregators.build("mean")
    with pytest.raises(ValueError, match=r"mean: weights \[1\] are negative"):
        rule(x, weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="mean: weights must have shape"):
        rule(x, weights=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="mean: weights sum to zero"):
        rule(x, weights=torch.zeros(3))
    with pytest.raises(ValueError, match=r"mean: weights \[2\] are NaN"):
        rule(x, weights=torch.tensor([1.0, 1.0, float("nan")]))


# --- median -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_median_odd_and_even(dtype: torch.dtype) -> None:
    rule = aggregators.build("median")
    odd = stack([[1.0, 9.0], [2.0, -5.0], [100.0, 7.0]], dtype)
    out = rule(odd)
    assert torch.equal(out.vector, torch.tensor([2.0, 7.0], dtype=dtype))
    assert out.selected.tolist() == [False, True, True]
    # Scores: Euclidean distance of each row to the output.
    assert torch.allclose(out.scores, torch.tensor([(1 + 4) ** 0.5, 12.0, 98.0], dtype=torch.float64))
    even = stack([[1.0], [2.0], [4.0], [100.0]], dtype)
    assert torch.equal(rule(even).vector, torch.tensor([3.0], dtype=dtype))


def test_median_of_huge_float32_values_does_not_overflow() -> None:
    big = 3.0e38
    x = torch.tensor([[big], [big], [-big], [big]], dtype=torch.float32)
    assert torch.equal(aggregators.build("median")(x).vector, torch.tensor([big], dtype=torch.float32))


# --- trimmed mean -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_trimmed_mean_known_answer(dtype: torch.dtype) -> None:
    x = stack([[1.0, -50.0], [2.0, 1.0], [3.0, 2.0], [4.0, 3.0], [1000.0, 4.0]], dtype)
    out = aggregators.build("trimmed-mean", num_byzantine=1)(x)
    assert torch.allclose(out.vector, torch.tensor([3.0, 2.0], dtype=dtype))
    # Rows 0 and 4 hold an extreme value in both coordinates; rows 1-3 are never trimmed.
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert out.selected.tolist() == [False, True, True, True, False]


def test_trimmed_mean_ignores_huge_attacker_values_exactly() -> None:
    # Summing the kept values (not total minus extremes) keeps the honest values exact.
    x = torch.tensor([[1e30], [1.0], [2.0], [3.0], [-1e30]], dtype=torch.float64)
    assert aggregators.build("trimmed-mean", num_byzantine=1)(x).vector.item() == 2.0


def test_trimmed_mean_with_zero_f_is_the_mean() -> None:
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = aggregators.build("trimmed-mean", num_byzantine=0)(x)
    assert torch.allclose(out.vector, x.mean(dim=0))
    assert out.selected.all() and (out.scores == 0).all()


# --- krum / multi-krum ------------------------------------------------------------------------


def clustered(n_honest: int, n_bad: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    honest = 1.0 + 0.01 * torch.randn(n_honest, d, generator=g, dtype=torch.float64)
    bad = -5.0 + 0.01 * torch.randn(n_bad, d, generator=g, dtype=torch.float64)
    return torch.cat([honest, bad]).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_krum_picks_the_row_closest_to_its_neighbours(dtype: torch.dtype) -> None:
    x = stack([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.05, 0.05], [10.0, 10.0]], dtype)
    out = aggregators.build("krum", num_byzantine=1)(x)
    # n - f - 2 = 2 neighbours: row 3's two nearest are at squared distance 0.005 each.
    assert torch.equal(out.vector, x[3])
    assert out.selected.tolist() == [False, False, False, True, False]
    assert out.scores[3].item() == pytest.approx(0.01)
    assert out.scores[0].item() == pytest.approx(0.005 + 0.01)
    assert int(out.scores.argmax()) == 4


def test_multi_krum_averages_the_lowest_scores() -> None:
    x = clustered(7, 2, 20)
    out = aggregators.build("multi-krum", num_byzantine=2)(x)
    assert out.selected.tolist() == [True] * 7 + [False] * 2
    assert torch.allclose(out.vector, x[:7].mean(dim=0))
    three = aggregators.build("multi-krum", num_byzantine=2, num_selected=3)(x)
    assert int(three.selected.sum()) == 3 and not three.selected[7:].any()
    weighted = aggregators.build("multi-krum", num_byzantine=2)(x, weights=torch.arange(1.0, 10.0))
    w = torch.arange(1.0, 8.0, dtype=torch.float64)
    assert torch.allclose(weighted.vector, (w[:, None] * x[:7]).sum(0) / w.sum())


def test_multi_krum_num_selected_too_large() -> None:
    with pytest.raises(ValueError, match="num_selected=9 exceeds n=5"):
        aggregators.build("multi-krum", num_byzantine=1, num_selected=9)(torch.randn(5, 3))


# --- validation shared by all rules -----------------------------------------------------------

ALL_RULES = [name for name in aggregators.available() if not name.startswith("test-")]


def build_ready(name: str, num_byzantine: int, d: int):
    """Build a rule and, for FLTrust, give it a trusted update so it can be called once."""
    rule = aggregators.build(name, num_byzantine=num_byzantine)
    if getattr(rule, "needs_trusted_update", False):
        rule.set_trusted_update(torch.ones(d))
    return rule


@pytest.mark.parametrize("name", ALL_RULES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_are_rejected_with_indices(name: str, bad: float) -> None:
    x = torch.randn(12, 4)
    x[3, 1] = bad
    x[7, 0] = bad
    with pytest.raises(ValueError, match=rf"{name}: rows \[3, 7\] contain NaN or Inf"):
        build_ready(name, 1, 4)(x)


@pytest.mark.parametrize("name", ALL_RULES)
def test_shape_and_dtype_are_checked(name: str) -> None:
    rule = build_ready(name, 0, 3)
    with pytest.raises(ValueError, match=f"{name}: updates must be 2-D"):
        rule(torch.zeros(5))
    with pytest.raises(ValueError, match=f"{name}: updates must have n >= 1"):
        rule(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=f"{name}: updates must be floating point"):
        rule(torch.zeros(5, 3, dtype=torch.int64))


@pytest.mark.parametrize(
    "name, n, f",
    [("krum", 6, 2), ("multi-krum", 4, 1), ("trimmed-mean", 4, 2), ("bulyan", 10, 2), ("meamed", 2, 1), ("dnc", 2, 2)],
)
def test_impossible_parameters_name_rule_n_and_f(name: str, n: int, f: int) -> None:
    rule = aggregators.build(name, num_byzantine=f)
    with pytest.raises(ValueError, match=rf"{name}: needs .*n={n}, f={f}"):
        rule(torch.randn(n, 3))


@pytest.mark.parametrize("name, n, f", [("krum", 7, 2), ("multi-krum", 5, 1), ("trimmed-mean", 5, 2), ("bulyan", 11, 2)])
def test_smallest_possible_n_is_accepted(name: str, n: int, f: int) -> None:
    out = aggregators.build(name, num_byzantine=f)(torch.randn(n, 3))
    assert out.vector.shape == (3,)


@pytest.mark.parametrize("name", ALL_RULES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_output_keeps_dtype_and_shapes(name: str, dtype: torch.dtype) -> None:
    x = clustered(9, 2, 8, dtype=dtype)
    out = build_ready(name, 2, 8)(x)
    assert out.vector.dtype == dtype and out.vector.shape == (8,)
    assert out.scores.dtype == torch.float64 and out.scores.shape == (11,)
    assert out.selected.dtype == torch.bool and out.selected.shape == (11,)
    assert bool(out.selected.any())


# --- bulyan -----------------------------------------------------------------------------------


def test_bulyan_drops_outliers_and_averages_the_central_values() -> None:
    # n = 7, f = 1: theta = 5 rows picked by iterated Krum, beta = 3 values kept per coordinate.
    # On 0..5 and 100 iterated Krum takes 3, 2, 4, 1, 5 (this symmetric input ties at every
    # step; ties go to the more central row, never to the lower index), i.e. the values 1..5;
    # the 3 values closest to their median 3 are 2, 3, 4.
    x = stack([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [100.0]])
    out = aggregators.build("bulyan", num_byzantine=1)(x)
    assert out.vector.item() == 3.0
    assert out.selected.tolist() == [False, False, True, True, True, False, False]
    assert out.scores.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_krum_ties_do_not_depend_on_row_order() -> None:
    # f = 0, n = 3: one neighbour, so the mutual nearest pair (0, 1) ties; the row whose second
    # neighbour is closer (1.0, nearer to 3.0) wins in either order.
    x = stack([[0.0], [1.0], [3.0]])
    assert aggregators.build("krum")(x).vector.item() == 1.0
    assert aggregators.build("krum")(x.flip(0)).vector.item() == 1.0


# --- meamed -----------------------------------------------------------------------------------


def test_meamed_keeps_values_closest_to_the_median() -> None:
    x = stack([[0.0], [1.0], [2.0], [2.5], [50.0]])
    out = aggregators.build("meamed", num_byzantine=2)(x)
    # median 2; the 3 closest values are 1, 2, 2.5.
    assert out.vector.item() == pytest.approx(5.5 / 3)
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert out.selected.tolist() == [False, True, True, True, False]


@pytest.mark.parametrize("portable", [False, True])
def test_meamed_keeps_every_value_nearer_than_a_tie(portable: bool) -> None:
    # Median 1.5, three kept: 1.5 and 1.8 are strictly nearer than 0, 0 and 3 (all at 1.5), so
    # both stay, and the tie goes to the lower side: 0, 1.5, 1.8. The window 0, 0, 1.5 has the
    # same reach but would drop 1.8 for a farther 0.
    x = stack([[0.0], [0.0], [1.5], [1.8], [3.0]])
    with portable_kernels() if portable else nullcontext():
        out = aggregators.build("meamed", num_byzantine=2)(x)
    assert out.vector.item() == pytest.approx(3.3 / 3)
    assert out.scores.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


# --- geometric median -------------------------------------------------------------------------


def test_geometric_median_of_a_square_and_an_outlier() -> None:
    # Four corners of a square plus its centre (twice): the centre is the geometric median.
    x = stack([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [0.0, 0.0], [0.0, 0.0]])
    out = aggregators.build("geometric-median")(x)
    assert torch.allclose(out.vector, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    far = stack([[0.0, 0.0]] * 3 + [[1e6, 1e6]] * 2)
    # Majority at one point: the geometric median is that point, however far the rest (up to
    # the relative stopping tolerance on a 1e6-scale objective).
    assert torch.allclose(aggregators.build("geometric-median")(far).vector, torch.zeros(2, dtype=torch.float64), atol=1e-3)


def test_geometric_median_uses_weights() -> None:
    x = stack([[0.0], [1.0], [10.0]])
    # On a line the weighted geometric median is a weighted median: weight 5 on row 2 wins.
    out = aggregators.build("geometric-median")(x, weights=torch.tensor([1.0, 1.0, 5.0]))
    assert out.vector.item() == pytest.approx(10.0, abs=1e-4)


# --- centered clipping ------------------------------------------------------------------------


def test_centered_clipping_step_and_state() -> None:
    rule = aggregators.build("centered-clipping", tau=1.0, iterations=1)
    x = stack([[0.5, 0.0], [0.0, 0.5], [100.0, 0.0], [0.0, 0.0]])
    out = rule(x)
    # Centre 0: rows 0, 1, 3 within tau, row 2 clipped to [1, 0]: mean of [0.5,0],[0,0.5],[1,0],[0,0].
    assert torch.allclose(out.vector, torch.tensor([0.375, 0.125], dtype=torch.float64))
    saved = rule.state_dict()
    assert torch.allclose(saved["center"], out.vector)
    second = rule(x)  # starts from the previous aggregate
    fresh = aggregators.build("centered-clipping", tau=1.0, iterations=1)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh(x).vector, second.vector)
    assert not torch.equal(second.vector, out.vector)
    assert int(out.scores.argmax()) == 2


def test_centered_clipping_sensitivity_formula() -> None:
    rule = aggregators.build("centered-clipping", tau=0.5, iterations=3)
    assert rule.sensitivity(1.0, 10) == pytest.approx(3 * 2 * 0.5 / 10)
    assert rule.sensitivity(0.1, 10) == pytest.approx(3 * 2 * 0.1 / 10)


def test_centered_clipping_rejects_bad_saved_centre() -> None:
    rule = aggregators.build("centered-clipping")
    with pytest.raises(ValueError, match="centered-clipping: saved center"):
        rule.load_state_dict({"center": torch.tensor([float("nan")])})


# --- dnc --------------------------------------------------------------------------------------


def test_dnc_removes_the_outliers_along_the_top_direction() -> None:
    x = clustered(10, 2, 50, seed=3)
    rule = aggregators.build("dnc", num_byzantine=2, num_iters=3, subsample_dim=20, seed=1)
    out = rule(x)
    assert out.selected.tolist() == [True] * 10 + [False] * 2
    assert torch.allclose(out.vector, x[:10].mean(dim=0))
    assert (out.scores[10:] > out.scores[:10].max()).all()


def test_dnc_is_reproducible_by_seed_and_state() -> None:
    x = torch.randn(12, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    a = aggregators.build("dnc", num_byzantine=3, subsample_dim=30, seed=7)
    b = aggregators.build("dnc", num_byzantine=3, subsample_dim=30, seed=7)
    assert torch.equal(a(x).scores, b(x).scores)
    state = a.state_dict()
    next_a = a(x)
    b.load_state_dict(state)
    assert torch.equal(b(x).scores, next_a.scores)


# --- signsgd majority -------------------------------------------------------------------------


def test_sign_majority_vote() -> None:
    x = stack([[1.0, -2.0, 3.0], [2.0, -1.0, -3.0], [-5.0, -1.0, 0.0]])
    out = aggregators.build("signsgd-majority", scale=1.0)(x)
    # Third coordinate: +1, -1, 0 -> tie -> 0.
    assert out.vector.tolist() == [1.0, -1.0, 0.0]
    # Row 2 disagrees in coordinate 0 of the 3 (coordinate 2 is a tie and counts for no one).
    assert out.scores.tolist() == [0.0, 0.0, 1 / 3]
    scaled = aggregators.build("signsgd-majority")(x)
    # Default scale: median over rows of the mean |x| = median(2, 2, 2) = 2.
    assert scaled.vector.tolist() == [2.0, -2.0, 0.0]


# --- fltrust ----------------------------------------------------------------------------------


def test_fltrust_trust_scores_and_rescaling() -> None:
    rule = aggregators.build("fltrust")
    assert rule.needs_trusted_update is True
    x = stack([[2.0, 0.0], [0.0, 5.0], [-3.0, 0.0], [1.0, 1.0]])
    rule.set_trusted_update(torch.tensor([1.0, 0.0], dtype=torch.float64))
    out = rule(x)
    c = 2**-0.5
    # Trust: cos = 1, 0, -1 -> 0, c. Rows rescaled to norm 1: [1,0] and [c,c].
    expected = (1.0 * torch.tensor([1.0, 0.0]) + c * torch.tensor([c, c])) / (1.0 + c)
    assert torch.allclose(out.vector, expected.to(torch.float64))
    assert torch.allclose(out.scores, torch.tensor([0.0, 1.0, 1.0, 1 - c], dtype=torch.float64))
    assert out.selected.tolist() == [True, False, False, True]


def test_fltrust_requires_a_fresh_trusted_update() -> None:
    rule = aggregators.build("fltrust")
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="fltrust: call set_trusted_update"):
        rule(x)
    rule.set_trusted_update(torch.ones(2))
    rule(x)
    with pytest.raises(ValueError, match="fltrust: call set_trusted_update"):
        rule(x)  # consumed: never reuse last round's trusted update
    with pytest.raises(ValueError, match="zero norm"):
        rule.set_trusted_update(torch.zeros(2))
    rule.set_trusted_update(torch.ones(3))
    with pytest.raises(ValueError, match="d=2"):
        rule(x)


def test_fltrust_all_opposed_gives_zero() -> None:
    rule = aggregators.build("fltrust")
    rule.set_trusted_update(torch.tensor([1.0, 0.0]))
    out = rule(torch.tensor([[-1.0, 0.0], [-2.0, 1.0]]))
    assert torch.equal(out.vector, torch.zeros(2)) and not out.selected.any()


def test_rows_whose_sum_overflows_are_still_accepted() -> None:
    # The fast NaN/Inf screen sums each row; an overflowing but finite row must not be rejected.
    x = torch.full((3, 4), 3.0e38, dtype=torch.float32)
    out = aggregators.build("median")(x)
    assert torch.equal(out.vector, x[0])
