"""Pre-aggregation steps and the chain built by build(..., pre=[...])."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aggregators
from aggregators.pre import AdaptiveRobustClipping, Bucketing, Clip, NearestNeighborMixing


def random_stack(seed: int, n: int, d: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_available_pre_lists_the_steps() -> None:
    assert aggregators.available_pre() == sorted(["arc", "bucketing", "clip", "nnm", "flame", "foolsgold"])


# --- individual steps -------------------------------------------------------------------------


def test_clip_scales_long_rows_only() -> None:
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    new, mixing = Clip(norm=1.0)(x, None)
    assert new.norm(dim=1).tolist() == pytest.approx([1.0, 0.5, 0.0], rel=1e-6)
    assert torch.allclose(new[0], torch.tensor([0.6, 0.8], dtype=torch.float64), rtol=1e-6)
    assert torch.equal(new[1:], x[1:])
    assert torch.equal(mixing, torch.diag(torch.diagonal(mixing)))  # diagonal


def test_clip_never_exceeds_the_norm_in_float32() -> None:
    x = 1e3 * random_stack(0, 20, 1000).to(torch.float32)
    new, _ = Clip(norm=0.7)(x, None)
    assert float(new.to(torch.float64).norm(dim=1).max()) <= 0.7


def test_clip_rejects_bad_norm() -> None:
    with pytest.raises(ValueError, match="clip: norm must be a positive"):
        aggregators.build("mean", pre=["clip:norm=0"])


def test_arc_clips_the_k_largest_to_the_next_norm() -> None:
    # n = 10, f = 2: k = floor(2 * 0.2 * 8) = 3 rows clipped to the 4th largest norm (7).
    norms = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=torch.float64)
    x = torch.stack([torch.tensor([v, 0.0], dtype=torch.float64) for v in norms])
    new, mixing = AdaptiveRobustClipping(num_byzantine=2)(x, None)
    assert new[:, 0].tolist() == pytest.approx([1, 2, 3, 4, 5, 6, 7, 7, 7, 7])
    assert torch.diagonal(mixing)[-1].item() == pytest.approx(0.7)


def test_arc_with_f_zero_is_identity() -> None:
    x = random_stack(1, 5, 3)
    new, mixing = AdaptiveRobustClipping(num_byzantine=0)(x, None)
    assert torch.equal(new, x) and torch.equal(mixing, torch.eye(5, dtype=torch.float64))


def test_nnm_averages_the_n_minus_f_nearest() -> None:
    x = torch.tensor([[0.0], [1.0], [3.0], [100.0]], dtype=torch.float64)
    new, mixing = NearestNeighborMixing(num_byzantine=1)(x, None)
    # Nearest 3 (self included): row 0 -> {0,1,3}, row 1 -> {0,1,3}, row 2 -> {0,1,3}, row 3 -> {1,3,100}.
    assert new[:, 0].tolist() == pytest.approx([4 / 3, 4 / 3, 4 / 3, 104 / 3])
    assert torch.allclose(mixing.sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_nnm_needs_n_greater_than_f() -> None:
    with pytest.raises(ValueError, match="nnm: needs n > f, got n=2, f=2"):
        NearestNeighborMixing(num_byzantine=2)(torch.randn(2, 3), None)


def test_bucketing_partitions_and_is_seeded() -> None:
    x = random_stack(2, 7, 4)
    new, mixing = Bucketing(size=3, seed=5)(x, None)
    assert new.shape == (3, 4) and mixing.shape == (3, 7)
    # Every client is in exactly one bucket; bucket sizes 3, 3, 1.
    assert ((mixing > 0).sum(dim=0) == 1).all()
    assert sorted((mixing > 0).sum(dim=1).tolist()) == [1, 3, 3]
    again, same_mixing = Bucketing(size=3, seed=5)(x, None)
    assert torch.equal(again, new) and torch.equal(same_mixing, mixing)


def test_bucketing_reshuffles_each_call_and_restores_state() -> None:
    step = Bucketing(size=2, seed=0)
    x = random_stack(3, 10, 2)
    state = step.state_dict()
    first = step(x, None)[1]
    second = step(x, None)[1]
    assert not torch.equal(first, second)
    step.load_state_dict(state)
    assert torch.equal(step(x, None)[1], first)


@settings(max_examples=20, derandomize=True, deadline=None)
@given(
    spec=st.sampled_from(["clip:norm=0.5", "arc", "nnm", "bucketing:size=2", "bucketing:size=3,seed=4"]),
    n=st.integers(3, 12),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_step_satisfies_new_equals_mixing_times_old(spec: str, n: int, d: int, seed: int) -> None:
    from aggregators.registry import build_pre_step

    x = random_stack(seed, n, d)
    new, mixing = build_pre_step(spec, num_byzantine=1)(x, None)
    assert mixing.shape == (new.shape[0], n) and (mixing >= 0).all()
    assert torch.allclose(new, mixing @ x, rtol=1e-6, atol=1e-12)


# --- the chain --------------------------------------------------------------------------------


def test_chain_maps_bucket_scores_and_selection_back_to_clients() -> None:
    x = random_stack(4, 12, 5)
    x[11] += 100.0
    rule = aggregators.build("krum", num_byzantine=1, pre=["bucketing:size=2,seed=3"])
    out = rule(x)
    assert out.scores.shape == (12,) and out.selected.shape == (12,)
    # Recompute by hand with the same shuffle: each client gets its bucket's score.
    new, mixing = Bucketing(size=2, seed=3)(x, None)
    inner = aggregators.build("krum", num_byzantine=1)(new)
    bucket_of = mixing.argmax(dim=0)
    assert torch.allclose(out.scores, inner.scores[bucket_of])
    assert torch.equal(out.selected, inner.selected[bucket_of])
    assert torch.equal(out.vector, inner.vector)
    assert int(out.scores.argmax()) in bucket_of.eq(bucket_of[11]).nonzero().flatten().tolist()


def test_chain_with_nnm_flags_the_outlier() -> None:
    x = random_stack(5, 10, 6)
    x[3] += 1e3
    out = aggregators.build("trimmed-mean", num_byzantine=2, pre=["nnm"])(x)
    assert int(out.scores.argmax()) == 3
    assert out.scores.shape == (10,)


def test_chain_score_is_mixing_weighted_mean() -> None:
    # Client score = sum_i share[i, j] * row_score[i] / sum_i share[i, j]; check on NNM.
    x = random_stack(6, 8, 3)
    out = aggregators.build("median", num_byzantine=2, pre=["nnm"])(x)
    new, mixing = NearestNeighborMixing(num_byzantine=2)(x, None)
    inner = aggregators.build("median")(new)
    expected = (mixing * inner.scores[:, None]).sum(0) / mixing.sum(0)
    assert torch.allclose(out.scores, expected)
    assert torch.equal(out.selected, ((mixing > 0) & inner.selected[:, None]).any(0))


def test_chain_of_two_steps_composes_mixing() -> None:
    x = random_stack(7, 9, 4)
    out = aggregators.build("mean", pre=["clip:norm=0.5", "bucketing:size=3,seed=1"])(x)
    clipped, _ = Clip(norm=0.5)(x, None)
    bucketed, _ = Bucketing(size=3, seed=1)(clipped, None)
    assert torch.allclose(out.vector, bucketed.mean(dim=0))
    assert out.selected.all()


def test_chain_propagates_weights_as_bucket_sums() -> None:
    x = torch.tensor([[0.0], [2.0], [10.0], [20.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 1.0, 0.0, 6.0])
    out = aggregators.build("mean", pre=["bucketing:size=2,seed=0"])(x, weights=weights)
    new, mixing = Bucketing(size=2, seed=0)(x, None)
    bucket_weights = (mixing > 0).double() @ weights.double()
    expected = (bucket_weights[:, None] * new).sum(0) / bucket_weights.sum()
    assert torch.allclose(out.vector, expected)


def test_chain_sensitivity_only_for_row_preserving_steps() -> None:
    clipped = aggregators.build("mean", pre=["clip:norm=0.5"])
    assert clipped.sensitivity(1.0, 10) == pytest.approx(2 * 0.5 / 10)
    bucketed = aggregators.build("trimmed-mean", num_byzantine=1, pre=["bucketing:size=2"])
    assert bucketed.sensitivity(1.0, 10) == pytest.approx(2.0 / (5 - 2))
    assert not hasattr(aggregators.build("mean", num_byzantine=1, pre=["nnm"]), "sensitivity")
    assert not hasattr(aggregators.build("mean", num_byzantine=1, pre=["arc"]), "sensitivity")
    assert not hasattr(aggregators.build("meamed", num_byzantine=1, pre=["clip"]), "sensitivity")


def test_chain_passes_the_trusted_update_and_state() -> None:
    rule = aggregators.build("fltrust", pre=["clip:norm=1.0"])
    assert rule.needs_trusted_update
    rule.set_trusted_update(torch.tensor([1.0, 0.0]))
    out = rule(torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]]))
    assert out.selected.tolist() == [True, False, False]
    cc = aggregators.build("centered-clipping", pre=["bucketing"])
    cc(random_stack(8, 6, 3))
    state = cc.state_dict()
    assert state["rule"]["center"].shape == (3,) and "generator" in state["pre"][0]
    twin = aggregators.build("centered-clipping", pre=["bucketing"])
    twin.load_state_dict(state)
    x = random_stack(9, 6, 3)
    assert torch.equal(twin(x).vector, cc(x).vector)


def test_chain_name_and_pre_specs() -> None:
    rule = aggregators.build("trimmed-mean", num_byzantine=2, pre=["nnm", "bucketing:size=2,seed=9"])
    assert rule.name == "nnm+bucketing+trimmed-mean"
    assert rule.steps[0].num_byzantine == 2 and rule.steps[1].seed == 9
    with pytest.raises(ValueError, match=r"unknown pre-aggregation 'nmm'; available: \['arc'"):
        aggregators.build("mean", pre=["nmm"])
    with pytest.raises(ValueError, match=r"bucketing.*\['width'\]"):
        aggregators.build("mean", pre=["bucketing:width=2"])
    with pytest.raises(ValueError, match="not key=value"):
        aggregators.build("mean", pre=["bucketing:2"])


def test_pre_step_by_import_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rule = aggregators.build("mean", pre=["custom_rule_example:ShrinkRows:factor=0.25"])
    x = torch.tensor([[4.0], [8.0]])
    assert torch.equal(rule(x).vector, torch.tensor([1.5]))


def test_chain_rejects_non_finite_input_before_any_step() -> None:
    x = torch.ones(5, 2)
    x[4, 0] = math.nan
    with pytest.raises(ValueError, match=r"rows \[4\] contain NaN"):
        aggregators.build("mean", pre=["clip"])(x)
