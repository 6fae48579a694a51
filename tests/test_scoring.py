"""Client anomaly scoring: robust z-scores, the combined score, detection quality, scores.csv."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.reputation import Reputation
from server.scoring import (
    DEFAULT_Z_HALF,
    DEFAULT_Z_ONSET,
    ClientScores,
    auroc,
    detection_quality,
    read_scores_csv,
    robust_z,
    score_features,
    score_updates,
    write_scores_csv,
)

NUM_HONEST = 16
NUM_ATTACKERS = 4
DIM = 500


def honest_and_attackers(attack: str, seed: int = 0) -> torch.Tensor:
    """16 similar honest updates (a shared direction plus client noise), then 4 attackers."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(DIM, generator=g)
    honest = direction + 0.5 * torch.randn(NUM_HONEST, DIM, generator=g)
    like_honest = direction + 0.5 * torch.randn(NUM_ATTACKERS, DIM, generator=g)
    attackers = {
        "sign-flip": -like_honest,
        "scale-x10": 10.0 * like_honest,
        "gaussian": torch.randn(NUM_ATTACKERS, DIM, generator=g),
    }[attack]
    return torch.cat([honest, attackers]).float()


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    return updates.median(dim=0).values


# ------------------------------------------------------------------------------------ robust_z
def test_robust_z_matches_median_and_mad_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    # median 3, |x - 3| = 2, 1, 0, 1, 97 -> MAD 1, scale 1.4826
    expected = torch.tensor([-2.0, -1.0, 0.0, 1.0, 97.0], dtype=torch.float64) / 1.4826
    assert torch.allclose(robust_z(values), expected)
    assert robust_z(values).dtype == torch.float64


def test_robust_z_of_identical_values_is_zero_not_inf_or_nan():
    for value in (0.0, 1.0, -3e7):
        z = robust_z(torch.full((7,), value))
        assert torch.equal(z, torch.zeros(7, dtype=torch.float64))


def test_robust_z_floor_keeps_rounding_noise_small():
    # Differences at 1e-9 relative are rounding noise: the relative floor (1e-3 |median|) keeps them tiny.
    values = torch.tensor([1.0, 1.0 + 1e-9, 1.0 - 1e-9, 1.0, 1.0], dtype=torch.float64)
    assert robust_z(values).abs().max() < 1e-5


def test_robust_z_uses_mean_absolute_deviation_when_mad_is_zero():
    # Most values equal: MAD 0, so 1.2533 * mean |x - median| is the scale (here 1.2533 * 2/5).
    values = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    assert torch.allclose(robust_z(values)[3], torch.tensor(1.0 / (1.2533 * 0.4), dtype=torch.float64))


def test_robust_z_passes_non_finite_entries_through():
    z = robust_z(torch.tensor([1.0, 2.0, 3.0, math.inf, math.nan]))
    assert z[3] == math.inf and math.isnan(z[4])
    assert torch.isfinite(z[:3]).all()


def test_robust_z_rejects_non_vector_input():
    with pytest.raises(ValueError, match="1-D"):
        robust_z(torch.zeros(2, 2))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30), st.floats(-1e3, 1e3), st.floats(0.5, 100.0))
def test_robust_z_is_finite_and_affine_invariant(values, shift, scale):
    x = torch.tensor(values, dtype=torch.float64)
    z = robust_z(x)
    assert torch.isfinite(z).all()
    # Where the MAD dominates both floors before and after, shifting and scaling leave z unchanged.
    y = x * scale + shift
    def mad_dominates(v: torch.Tensor) -> bool:
        median = torch.quantile(v, 0.5)
        mad = torch.quantile((v - median).abs(), 0.5)
        return float(mad) > 1e-2 * float(median.abs()) + 1e-9
    if mad_dominates(x) and mad_dominates(y):
        assert torch.allclose(robust_z(y), z, atol=1e-6)


# ------------------------------------------------------------------------------- score_updates
@pytest.mark.parametrize("attack", ["sign-flip", "scale-x10", "gaussian"])
def test_attackers_score_at_least_half_and_honest_below(attack):
    updates = honest_and_attackers(attack)
    scores = score_updates(updates, coordinate_median(updates))
    assert (scores.combined[NUM_HONEST:] >= 0.5).all(), scores.combined[NUM_HONEST:]
    assert (scores.combined[:NUM_HONEST] < 0.5).all(), scores.combined[:NUM_HONEST]
    labels = np.array([False] * NUM_HONEST + [True] * NUM_ATTACKERS)
    assert auroc(scores.combined.numpy(), labels) == 1.0


def test_each_attack_shows_on_the_feature_it_distorts():
    flip = score_updates(u := honest_and_attackers("sign-flip"), coordinate_median(u))
    assert (flip.cosine_z[NUM_HONEST:] > DEFAULT_Z_HALF).all()  # pointing the other way
    assert (flip.cosine[NUM_HONEST:] < 0).all()
    scaled = score_updates(u := honest_and_attackers("scale-x10"), coordinate_median(u))
    assert (scaled.norm_z[NUM_HONEST:] > DEFAULT_Z_HALF).all()  # signed: larger than peers
    assert (scaled.cosine[NUM_HONEST:] > 0.5).all()  # same direction as the honest ones


def test_combined_score_formula_and_threshold_meaning():
    # One feature at exactly z: combined = 1 - 2^(-(z - 3) / 3.5); 0.5 exactly at z = 6.5.
    assert (DEFAULT_Z_ONSET, DEFAULT_Z_HALF) == (3.0, 6.5)
    for z, expected in ((2.0, 0.0), (3.0, 0.0), (4.5, 1 - 2 ** (-1.5 / 3.5)), (6.5, 0.5), (10.0, 0.75)):
        # median 2, MAD 1: the last client's rule score sits exactly z robust sd out.
        rule = torch.tensor([0.0, 1.0, 2.0, 2.0, 3.0, 4.0, 2.0 + z * 1.4826], dtype=torch.float64)
        updates = torch.ones(7, 3)  # identical updates: only the rule score differs
        scores = score_updates(updates, torch.ones(3), rule)
        assert scores.rule_z[-1] == pytest.approx(z)
        assert scores.combined[-1].item() == pytest.approx(expected, abs=1e-12)


def test_kinds_of_evidence_add_in_quadrature():
    # Two clients out on two kinds at once (direction and smallness); one out on size alone.
    norm = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.0, 1.0], dtype=torch.float64)
    cosine = torch.tensor([0.5, 0.52, 0.48, 0.51, 0.49, 0.5, 0.5, 0.5], dtype=torch.float64)
    scores = score_features(norm, cosine, norm.clone(), None)
    expected = torch.stack([torch.stack([scores.norm_z, scores.distance_z]).amax(0).clamp(min=0),
                            scores.cosine_z.clamp(min=0), (-scores.log_norm_z).clamp(min=0)]).square().sum(0).sqrt()
    assert torch.allclose(scores.evidence, expected)
    two_kinds = score_features(torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.0, 0.2], dtype=torch.float64),
                               torch.tensor([0.5, 0.52, 0.48, 0.51, 0.49, 0.5, 0.5, 0.3], dtype=torch.float64),
                               norm.clone(), None)
    z_small, z_cos = -two_kinds.log_norm_z[-1].item(), two_kinds.cosine_z[-1].item()
    assert two_kinds.evidence[-1].item() == pytest.approx(math.hypot(z_small, z_cos))


def test_one_kind_of_evidence_needs_the_full_threshold():
    # Size features (norm, distance, rule score) are one kind: their maximum counts, not their sum,
    # so an honest client with a big update (much data, a hard label mix) is not counted three times.
    norm = 1.0 + 0.01 * torch.arange(-9, 11, dtype=torch.float64)  # 0.91 .. 1.10, MAD 0.05
    norm[0] = 1.005 + 5.5 * 1.4826 * 0.05  # 5.5 robust sd above the median
    cosine = torch.full((20,), 0.5, dtype=torch.float64)
    scores = score_features(norm, cosine, norm.clone(), norm.clone())
    size = torch.stack([scores.norm_z, scores.distance_z, scores.rule_z])[:, 0]
    assert (size > 5.0).all() and torch.linalg.vector_norm(size) > DEFAULT_Z_HALF  # summed, it would flag
    assert scores.evidence[0].item() == pytest.approx(size.max().item())
    assert scores.combined[0] < 0.5


def test_a_small_fraction_of_the_peers_norm_is_evidence_the_linear_norm_cannot_give():
    # IPM-like: a row a tenth of the honest norms. Its linear z is bounded by -median/scale; its
    # log norm is far out.
    rng = np.random.default_rng(2)
    norm = torch.tensor(np.exp(rng.normal(0.0, 0.4, 20)), dtype=torch.float64)
    norm[-1] = 0.1 * float(norm[:-1].median())
    scores = score_features(norm, torch.full((20,), 0.5, dtype=torch.float64), norm.clone(), None)
    assert scores.norm_z[-1] > -4.0
    assert scores.log_norm_z[-1] < -DEFAULT_Z_HALF
    assert scores.combined[-1] >= 0.5
    # An honest client with little data (a third of the median norm) is no such evidence.
    norm[-1] = float(norm[:-1].median()) / 3.0
    assert score_features(norm, torch.full((20,), 0.5, dtype=torch.float64), norm.clone(), None).combined[-1] < 0.5


def test_log_norms_within_the_natural_spread_are_not_evidence():
    # Identical norms but one at 70% of the others: the log spread is floored at 0.3 (a factor 1.35).
    norm = torch.ones(10, dtype=torch.float64)
    norm[0] = 0.7
    scores = score_features(norm, torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64))
    assert scores.log_norm_z[0].item() == pytest.approx(math.log(0.7) / 0.3)


def test_a_zero_update_among_real_ones_is_fully_suspicious_and_all_zero_is_not():
    updates = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)) + 3.0
    updates[2] = 0.0
    scores = score_updates(updates, updates.median(dim=0).values)
    assert torch.isfinite(scores.log_norm_z).all() and scores.combined[2] > 0.99
    none_moved = score_updates(torch.zeros(6, 4), torch.zeros(4))
    assert torch.equal(none_moved.combined, torch.zeros(6, dtype=torch.float64))


def test_score_features_scores_stored_features_like_score_updates():
    updates = honest_and_attackers("sign-flip", seed=5)
    aggregate = coordinate_median(updates)
    rule = torch.linspace(0.0, 1.0, len(updates), dtype=torch.float64)
    live = score_updates(updates, aggregate, rule)
    again = score_features(live.norm, live.cosine, live.distance, rule)
    for name in ("norm_z", "cosine_z", "distance_z", "rule_z", "log_norm_z", "evidence", "combined"):
        assert torch.equal(getattr(live, name), getattr(again, name)), name
    with pytest.raises(ValueError, match="norms must be finite and >= 0"):
        score_features(-live.norm, live.cosine, live.distance)
    with pytest.raises(ValueError, match=r"must be \(n,\) alike"):
        score_features(live.norm, live.cosine[:3], live.distance)


def test_rule_scores_are_used_and_constant_ones_ignored():
    updates = honest_and_attackers("sign-flip")[:NUM_HONEST]
    aggregate = updates.mean(dim=0)
    flat = score_updates(updates, aggregate, torch.full((NUM_HONEST,), 7.0))
    assert torch.equal(flat.rule_z, torch.zeros(NUM_HONEST, dtype=torch.float64))
    rule = torch.arange(NUM_HONEST, dtype=torch.float64)
    rule[3] = 1e6
    with_rule = score_updates(updates, aggregate, rule)
    assert with_rule.combined[3] > 0.99
    none = score_updates(updates, aggregate, None)
    assert torch.equal(none.rule_z, torch.zeros(NUM_HONEST, dtype=torch.float64))


def test_nan_rule_score_is_no_evidence_and_inf_is_fully_suspicious():
    updates = torch.ones(5, 4)
    rule = torch.tensor([1.0, 1.1, 0.9, math.nan, math.inf], dtype=torch.float64)
    scores = score_updates(updates, torch.ones(4), rule)
    assert scores.rule_z[3] == 0.0
    assert scores.combined[4] == 1.0
    assert torch.isfinite(scores.combined).all()


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_clients_score_zero(n):
    updates = torch.tensor([[1.0, 2.0], [-50.0, 3.0]])[:n]
    scores = score_updates(updates, updates.mean(dim=0), torch.arange(n, dtype=torch.float64))
    for name in ("norm_z", "cosine_z", "distance_z", "rule_z", "combined"):
        assert torch.equal(getattr(scores, name), torch.zeros(n, dtype=torch.float64)), name
    # The raw features are still measured.
    assert scores.norm[0].item() == pytest.approx(math.sqrt(5.0))


def test_zero_aggregate_and_zero_updates_give_finite_scores():
    updates = torch.zeros(4, 3)
    updates[0] = torch.tensor([1.0, 0.0, 0.0])
    scores = score_updates(updates, torch.zeros(3))
    assert torch.equal(scores.cosine, torch.zeros(4, dtype=torch.float64))
    assert torch.isfinite(scores.combined).all()


def test_distances_are_accumulated_in_float64_without_cancellation():
    # Large common offset, tiny differences: |u|^2 + |a|^2 - 2u.a in float32 would be pure noise.
    base = torch.full((1000,), 1000.0)
    updates = torch.stack([base, base, base, base]).double()
    updates[3, 0] += 1.0
    scores = score_updates(updates.float(), base.float())
    assert scores.distance.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0], abs=1e-9)


def test_chunking_does_not_change_the_result():
    updates = honest_and_attackers("gaussian", seed=3)
    aggregate = coordinate_median(updates)
    whole = score_updates(updates, aggregate)
    chunked = score_updates(updates, aggregate, max_chunk_elements=3 * DIM + 7)
    for name in ("norm", "cosine", "distance", "combined"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), rtol=1e-12, atol=1e-12)


def test_as_rows_gives_plain_numbers_per_node():
    updates = honest_and_attackers("scale-x10")
    scores = score_updates(updates, coordinate_median(updates))
    node_ids = list(range(100, 120))
    rows = scores.as_rows(node_ids)
    assert [row["node_id"] for row in rows] == node_ids
    assert set(rows[0]) == {"node_id", "norm", "cosine", "distance", "norm_z", "cosine_z", "distance_z", "rule_z",
                            "log_norm_z", "evidence"}
    assert rows[19]["norm_z"] == pytest.approx(float(scores.norm_z[19]))
    assert all(type(v) in (int, float) for row in rows for v in row.values())
    with pytest.raises(ValueError, match="3 node ids for 20"):
        scores.as_rows([1, 2, 3])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="2-D floating"):
        score_updates(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"aggregate must be .* shape \(4,\)"):
        score_updates(torch.zeros(3, 4), torch.zeros(5))
    bad = torch.zeros(3, 4)
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        score_updates(bad, torch.zeros(4))
    with pytest.raises(ValueError, match=r"rule_scores .* \(3,\)"):
        score_updates(torch.zeros(3, 4), torch.zeros(4), torch.zeros(2))


def test_client_scores_is_frozen():
    scores = score_updates(torch.eye(3), torch.zeros(3))
    assert isinstance(scores, ClientScores)
    with pytest.raises(AttributeError):
        scores.combined = torch.zeros(3)  # type: ignore[misc]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scores_on_cuda_match_cpu():
    updates = honest_and_attackers("sign-flip")
    aggregate = coordinate_median(updates)
    cpu = score_updates(updates, aggregate)
    gpu = score_updates(updates.cuda(), aggregate.cuda())
    assert gpu.combined.device.type == "cuda"
    assert torch.allclose(gpu.combined.cpu(), cpu.combined, atol=1e-9)


# ---------------------------------------------------------------------------- detection quality
def hand_made_rounds() -> list[dict]:
    # Node 3 is the attacker. Pairs (score, malicious):
    # r1: 1:0.1 h, 2:0.4 h, 3:0.9 m   r2: 1:0.2 h, 2:0.9 h, 3:0.6 m (2 flagged wrongly), r3: 3 rejected
    return [
        {"round": 1, "scores": {"1": 0.1, "2": 0.4, "3": 0.9}, "flagged": [3]},
        {"round": 2, "scores": {"1": 0.2, "2": 0.9, "3": 0.6}, "flagged": [2, 3]},
        {"round": 3, "scores": {"1": 0.0, "2": 0.1}, "flagged": [], "rejected": {"3": "non-finite values"}},
    ]


def test_detection_quality_by_hand():
    quality = detection_quality(hand_made_rounds(), {3})
    # Malicious scores 0.9, 0.6 against honest 0.1, 0.4, 0.2, 0.9, 0.0, 0.1:
    # 0.9 beats 5 and ties 1 (0.5) -> 5.5; 0.6 beats 5 -> 5; AUROC = 10.5 / (2 * 6).
    assert quality["auroc"] == pytest.approx(10.5 / 12)
    # Flagged pairs: (1,3) (2,2) (2,3): 2 of 3 malicious; both malicious pairs flagged.
    assert quality["precision"] == pytest.approx(2 / 3)
    assert quality["recall"] == 1.0
    assert (quality["pairs"], quality["malicious_pairs"], quality["flagged_pairs"]) == (8, 2, 3)


def test_detection_quality_is_none_without_both_classes():
    assert detection_quality(hand_made_rounds(), set()) is None
    assert detection_quality(hand_made_rounds(), {1, 2, 3}) is None
    assert detection_quality(hand_made_rounds(), {99}) is None  # attacker never scored


def test_detection_precision_is_none_when_nothing_flagged():
    rounds = [{"round": 1, "scores": {"1": 0.0, "2": 0.3}, "flagged": []}]
    quality = detection_quality(rounds, {2})
    assert quality["precision"] is None and quality["recall"] == 0.0 and quality["auroc"] == 1.0


def test_detection_quality_rejects_bad_scores():
    with pytest.raises(ValueError, match=r"rounds\[0\]\['scores'\]\['1'\].*not finite"):
        detection_quality([{"round": 1, "scores": {"1": math.nan, "2": 0.1}}], {1})
    with pytest.raises(ValueError, match="not an integer"):
        detection_quality([{"round": 1, "scores": {"node-a": 0.5}}], {1})


def test_auroc_agrees_with_scikit_learn_on_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=200).astype(float)  # many ties
    labels = rng.random(200) < 0.3
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


# ------------------------------------------------------------------------------------ scores.csv
def test_scores_csv_roundtrip(tmp_path):
    rounds = hand_made_rounds()
    rounds[0]["features"] = {"3": {"norm_z": 5.0, "cosine_z": 3.1, "distance_z": 4.0, "rule_z": 2.0}}
    rounds[0]["reputation"] = {"1": 0.05, "2": 0.2, "3": 0.45}
    path = write_scores_csv(rounds, tmp_path / "sub" / "scores.csv")
    rows = read_scores_csv(path)
    expected_pairs = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2)]
    assert [(r["round"], r["node_id"]) for r in rows] == expected_pairs
    row = rows[2]
    assert row["combined"] == 0.9 and row["flagged"] is True and row["reputation"] == 0.45
    assert (row["norm_z"], row["cosine_z"], row["distance_z"], row["rule_z"]) == (5.0, 3.1, 4.0, 2.0)
    assert rows[0]["norm_z"] is None and rows[0]["flagged"] is False
    header = path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["round", "node_id", "combined"] and header[-2:] == ["flagged", "reputation"]


def test_read_scores_csv_names_the_bad_cell(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("round,node_id,combined\n1,5,0.3\n2,5,high\n")
    with pytest.raises(ValueError, match=r"scores.csv:3: column 'combined' holds 'high'"):
        read_scores_csv(path)


# ------------------------------------------------------------------------------------ reputation
# (Reputation's tests live here: reputation is the across-rounds half of client scoring.)
def test_reputation_is_an_exponential_moving_average_from_zero():
    rep = Reputation("flag", decay=0.5)
    rep.observe(1, [11, 12], [0.1, 0.9])
    assert rep.reputations == pytest.approx({11: 0.05, 12: 0.45})
    rep.observe(2, [12], [0.3])  # node 11 absent: unchanged
    assert rep.reputations == pytest.approx({11: 0.05, 12: 0.375})
    rep.observe(3, [11, 12], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert rep.reputations == pytest.approx({11: 0.525, 12: 0.1875})
    no_memory = Reputation(decay=0.0)
    no_memory.observe(1, [1], [0.7])
    no_memory.observe(2, [1], [0.2])
    assert no_memory.reputations == pytest.approx({1: 0.2})


def test_flags_on_round_score_or_on_reputation():
    rep = Reputation("flag", decay=0.5, threshold=0.5)
    assert rep.observe(1, [1, 2, 3], [0.5, 0.49, 0.0]) == [1]  # score at threshold flags
    assert rep.observe(2, [1, 2, 3], [0.0, 0.49, 0.0]) == []  # reputation 1: 0.25, 2: 0.3675
    assert rep.observe(3, [1, 2, 3], [0.0, 0.49, 0.0]) == []  # 2: 0.42875
    # Node 2 never crosses in one round, but keeps scoring high: its reputation gets there.
    rep2 = Reputation("flag", decay=0.5, threshold=0.5)
    for r in range(1, 4):
        rep2.observe(r, [2], [1.0])
    assert rep2.observe(4, [2], [0.2]) == [2]  # 0.5 * 0.875 + 0.1 = 0.5375
    assert rep2.flag_counts == {2: 4}
    assert rep.flag_counts == {1: 1}


def test_quarantine_after_m_flags_for_k_rounds_then_released():
    rep = Reputation("quarantine", quarantine_after=2, quarantine_rounds=3)
    rep.observe(1, [7, 8], [0.9, 0.0])
    assert not rep.is_quarantined(7, 1) and rep.excluded(1, [7, 8], [0.9, 0.0]) == set()  # first flag tolerated
    rep.observe(2, [7, 8], [0.9, 0.0])  # second flag: quarantined from this round
    assert rep.excluded(2, [7, 8], [0.9, 0.0]) == {7}  # this round's update is dropped
    assert [rep.is_quarantined(7, r) for r in range(2, 7)] == [True, True, True, True, False]
    assert not any(rep.is_quarantined(8, r) for r in range(1, 7))
    assert rep.quarantines == {7: (2, 5)}
    # Released with a clean slate of strikes: one more flag is tolerated again.
    rep.observe(6, [7, 8], [0.9, 0.0])
    assert not rep.is_quarantined(7, 7)
    rep.observe(7, [7, 8], [0.9, 0.0])
    assert rep.is_quarantined(7, 8) and rep.flag_counts == {7: 4}


def test_flags_far_apart_do_not_add_up_to_a_quarantine():
    # Under label skew an honest client is flagged now and then; an attacker round after round.
    rep = Reputation("quarantine", quarantine_after=2, quarantine_rounds=3, strike_window=5)
    for server_round in range(1, 21):
        sporadic = 0.9 if server_round in (3, 8, 13, 18) else 0.0  # flagged every 5th round
        rep.observe(server_round, [1, 2], [sporadic, 0.95])
        if server_round == 2:
            assert rep.quarantines == {2: (2, 5)}  # flagged in rounds 1 and 2: out from round 2
    assert 1 not in rep.quarantines and rep.flag_counts[1] == 4
    close = Reputation("quarantine", strike_window=5)
    close.observe(3, [1], [0.9])
    close.observe(7, [1], [0.9])  # within 5 rounds of the first flag
    assert close.quarantines == {1: (7, 10)}
    forever = Reputation("quarantine", strike_window=None)  # the former rule: every flag since release
    forever.observe(3, [1], [0.9])
    forever.observe(18, [1], [0.9])
    assert forever.quarantines == {1: (18, 21)}


def test_reputation_reads_a_format_1_state_with_strike_counts():
    old = {"format": 1, "policy": "quarantine", "decay": 0.5, "threshold": 0.5, "quarantine_after": 2,
           "quarantine_rounds": 3, "last_round": 4, "reputation": {"7": 0.45}, "flags": {"7": 1},
           "strikes": {"7": 1}, "quarantine": {}, "forced": {}}
    rep = Reputation("quarantine")
    rep.load_state_dict(old)
    rep.observe(5, [7], [0.9])  # the saved strike counts as a flag of round 4
    assert rep.quarantines == {7: (5, 8)}


def test_exclude_drops_this_rounds_flagged_nodes_only():
    rep = Reputation("exclude", threshold=0.5)
    flagged = rep.observe(1, [1, 2, 3], [0.2, 0.95, 0.1])
    assert rep.excluded(1, [1, 2, 3], [0.2, 0.95, 0.1]) == set(flagged) == {2}
    # Next round node 2 looks clean and its reputation (0.2375) is below threshold: kept.
    rep.observe(2, [1, 2, 3], [0.0, 0.0, 0.0])
    assert rep.excluded(2, [1, 2, 3], [0.0, 0.0, 0.0]) == set()
    assert not rep.is_quarantined(2, 2)


@pytest.mark.parametrize("policy", ["flag", "trust-weighted"])
def test_flag_and_trust_weighted_policies_drop_nothing(policy):
    rep = Reputation(policy, quarantine_after=1)
    rep.observe(1, [1, 2], [1.0, 1.0])
    assert rep.excluded(1, [1, 2], [1.0, 1.0]) == set()
    assert not rep.is_quarantined(1, 2)


def test_trust_weights_are_one_minus_reputation_and_one_for_strangers():
    rep = Reputation("trust-weighted", decay=0.5)
    rep.observe(1, [1, 2], [0.8, 0.0])
    weights = rep.trust_weights([2, 1, 99])
    assert weights.dtype == torch.float64
    assert weights.tolist() == pytest.approx([1.0, 0.6, 1.0])


def test_reputation_state_roundtrips_through_json():
    rep = Reputation("quarantine", decay=0.3, quarantine_after=1, quarantine_rounds=2)
    rep.observe(1, [10, 20], [0.9, 0.1])
    rep.observe(2, [20, 30], [0.6, 0.0])
    restored = Reputation("quarantine", decay=0.3, quarantine_after=1, quarantine_rounds=2)
    restored.load_state_dict(json.loads(json.dumps(rep.state_dict())))
    assert restored.reputations == rep.reputations and restored.flag_counts == rep.flag_counts
    assert restored.quarantines == rep.quarantines == {10: (1, 3), 20: (2, 4)}
    # The restored object behaves the same from here on.
    assert restored.observe(5, [10, 20], [0.0, 0.7]) == rep.observe(5, [10, 20], [0.0, 0.7])
    assert restored.state_dict() == rep.state_dict()
    with pytest.raises(ValueError, match="round 4 observed after round 5"):
        restored.observe(4, [10], [0.0])


def test_reputation_rejects_bad_settings_and_input():
    with pytest.raises(ValueError, match="policy must be one of"):
        Reputation("ban")
    with pytest.raises(ValueError, match="decay"):
        Reputation(decay=1.0)
    with pytest.raises(ValueError, match="threshold"):
        Reputation(threshold=0.0)
    with pytest.raises(ValueError, match="quarantine_after"):
        Reputation(quarantine_after=0)
    with pytest.raises(ValueError, match="strike_window"):
        Reputation(strike_window=0)
    rep = Reputation()
    with pytest.raises(ValueError, match="2 node ids but 1 scores"):
        rep.observe(1, [1, 2], [0.5])
    with pytest.raises(ValueError, match="node 2 must be in \\[0, 1\\], got nan"):
        rep.observe(1, [1, 2], [0.5, math.nan])
    with pytest.raises(ValueError, match=r"duplicate node ids \[1\]"):
        rep.observe(1, [1, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match="format"):
        rep.load_state_dict({"reputation": {}})
    broken = Reputation().state_dict()
    broken["reputation"] = {"5": 1.5}
    with pytest.raises(ValueError, match=r"nodes \[5\] not in \[0, 1\]"):
        rep.load_state_dict(broken)
