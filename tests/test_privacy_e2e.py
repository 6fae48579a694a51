"""Differential privacy end to end: real federations on Flower's simulation engine.

Specification (digits, ``delta = 1e-5``, the neighbouring relations of ``server.privacy``'s docstring):

* ``dp=central`` with the mean and ``fraction-train`` sampling: the run reports, after every round
  ``r``, ``epsilon = epsilon_for(sigma, q, r, delta)`` with ``q`` = sampled / total clients. The
  server adds ``N(0, s^2 I)`` with ``s = sigma * 2C / n`` to the aggregate: the final model sits
  ``s * sqrt(R * d)`` (give or take ``R * C``) from the initial one.
* ``dp=client``: the reported epsilon is the worst client's, composed over the rounds that client
  took part in, at ``q = 1``. Each client's released update is its clipped update plus
  ``N(0, (2 sigma C)^2 I)`` (``server.privacy.local_noise_std``).
* ``target-epsilon``: a run whose budget allows ``k`` rounds stops cleanly before round ``k + 1``,
  says so in ``stopped_early``, keeps ``k`` rounds and writes ``model.pt``.
* A rule without a sensitivity bound (Bulyan, or any rule behind ``nnm``) is refused under
  ``dp=central`` with an error that names it and suggests ``dp=client``.
* Clipping composes with a robust rule: ``dp=central`` with the trimmed mean clips every update to
  ``C``, adds ``sigma * 2C / (n - 2f)`` noise and reports epsilon.

The four federations (central mean, client mean, central trimmed mean with a budget, Bulyan refused)
run once each, lazily, per module (about 2 minutes on 2 shared cores).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from client.task import load_task
from server.app import build_strategy, run_server
from server.run import RobustRun
from server.audit import AuditLog
from server.checkpoint import load_checkpoint
from server.privacy import DPConfigError, epsilon_for
from server.settings import RunSettings
from simulations.harness import run_federation

from conftest import PLAIN

DELTA = 1e-5
SIGMA = 1.0
CLIP = 0.5
#: No attacker: every client is honest, so every difference below is DP's doing.
HONEST = PLAIN | {"attack": "none", "num-malicious": 0, "dataset": "digits", "alpha": 0.0, "delta": DELTA,
          "clip-norm": CLIP, "noise-multiplier": SIGMA}
#: 8 clients, 4 sampled a round: q = 0.5.
SAMPLED = {"num-clients": 8, "fraction-train": 0.5, "rounds": 3}


# --------------------------------------------------------------------------------------------
# The federations (each runs once, only if a test needs it)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def central_mean(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("dp-central-mean") / "run"
    summary = run_federation(HONEST | SAMPLED | {"aggregator": "mean", "num-byzantine": 0, "dp": "central",
                                                 "out": str(out)})
    return summary, out


@pytest.fixture(scope="module")
def client_mean(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("dp-client-mean") / "run"
    # Seed 3 samples no client in all three rounds (checked below), so per-client accounting
    # and per-round accounting give different epsilons.
    summary = run_federation(HONEST | SAMPLED | {"aggregator": "mean", "num-byzantine": 0, "dp": "client",
                                                 "seed": 3, "out": str(out)})
    return summary, out


#: Between epsilon after 2 and after 3 rounds at sigma = 1, q = 1 (7.08 and 9.01 with RDP).
TARGET_EPSILON = 8.0
BUDGETED = {"num-clients": 8, "fraction-train": 1.0, "rounds": 5, "target-epsilon": TARGET_EPSILON}


@pytest.fixture(scope="module")
def central_trimmed_mean_with_budget(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("dp-central-trimmed") / "run"
    summary = run_federation(HONEST | BUDGETED | {"aggregator": "trimmed-mean", "num-byzantine": 2, "dp": "central",
                                                  "out": str(out)})
    return summary, out


def checkpoint_rounds(out: Path) -> list[dict]:
    """Each round's full record (with ``noise_std``), as the run directory keeps it for resuming
    (records.jsonl, which the checkpoint counts)."""
    from server.run import read_run_records

    state = load_checkpoint(out / "checkpoint.pt")
    assert state is not None, f"no checkpoint in {out}"
    return [line["record"] for line in read_run_records(out, state["records_length"])]


def flat(state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in state_dict.values()])


def initial_model(seed: int) -> torch.Tensor:
    """The global model before round 1, built the way ``run_server`` builds it."""
    torch.manual_seed(seed)
    return flat(load_task("digits-mlp").build_model({"dataset": "auto"}).state_dict())


def all_finite(summary: dict) -> bool:
    return all(math.isfinite(r["accuracy"]) and math.isfinite(r["loss"]) for r in summary["rounds"])


# --------------------------------------------------------------------------------------------
# 1. Central DP with the mean
# --------------------------------------------------------------------------------------------


def test_central_mean_reports_the_subsampled_gaussian_epsilon_after_every_round(central_mean):
    summary, _ = central_mean
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    sampled = {len(r["accepted"]) for r in rounds}
    assert sampled == {4}, "fraction-train 0.5 of 8 clients samples 4 a round"
    q = 4 / SAMPLED["num-clients"]
    for r in rounds:
        assert r["epsilon"] == pytest.approx(epsilon_for(SIGMA, q, r["round"], DELTA), rel=0.01)
    assert summary["privacy"]["mode"] == "central"
    assert summary["privacy"]["delta"] == DELTA
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilon_for(SIGMA, q, 3, DELTA), rel=0.01)
    # Sampling is what makes q < 1 cheaper: the same rounds at q = 1 would cost more.
    assert summary["privacy"]["epsilon"] < epsilon_for(SIGMA, 1.0, 3, DELTA)
    assert all_finite(summary)


def test_central_mean_noise_std_is_sigma_times_the_mean_sensitivity(central_mean):
    _, out = central_mean
    for r in checkpoint_rounds(out):
        # n counts every sampled client: a rejected reply would stand in as a null (zero) update.
        n = len(r["sampled"])
        assert n == 4
        assert r["clip_norm"] == CLIP
        assert r["noise_std"] == pytest.approx(SIGMA * 2 * CLIP / n, rel=1e-9)


def test_central_mean_noise_of_that_std_really_reaches_the_model(central_mean):
    # final - initial = sum of R aggregates (each a mean of rows clipped to C, so norm <= C) plus
    # the sum of R noises, which is N(0, sum(s_r^2) I_d). Its norm concentrates at
    # sqrt(d * sum(s_r^2)) with a spread of about sqrt(sum(s_r^2) / 2).
    summary, out = central_mean
    moved = flat(torch.load(out / "model.pt", weights_only=True)) - initial_model(seed=0)
    total_variance = sum(r["noise_std"] ** 2 for r in checkpoint_rounds(out))
    expected = math.sqrt(moved.numel() * total_variance)
    tolerance = len(summary["rounds"]) * CLIP + 6 * math.sqrt(total_variance / 2)
    assert abs(float(moved.norm()) - expected) <= tolerance


def test_central_summary_rounds_carry_noise_std_and_clip_norm(central_mean):
    summary, _ = central_mean
    for r in summary["rounds"]:
        assert r["clip_norm"] == CLIP
        assert r["noise_std"] == pytest.approx(SIGMA * 2 * CLIP / 4, rel=1e-9)


# --------------------------------------------------------------------------------------------
# 2. Client (local) DP
# --------------------------------------------------------------------------------------------


def test_client_dp_epsilon_is_the_worst_clients_composition_over_its_own_rounds(client_mean):
    summary, _ = client_mean
    rounds = summary["rounds"]
    assert len(rounds) == SAMPLED["rounds"]
    participation: Counter[int] = Counter()
    for r in rounds:
        assert len(r["accepted"]) == 4
        participation.update(r["accepted"])
        worst = max(participation.values())
        assert r["epsilon"] == pytest.approx(epsilon_for(SIGMA, 1.0, worst, DELTA), rel=0.01)
    # Precondition that makes this test tell per-client from per-round accounting apart.
    assert max(participation.values()) < len(rounds)
    assert summary["privacy"]["mode"] == "client"
    assert summary["privacy"]["epsilon"] == pytest.approx(
        epsilon_for(SIGMA, 1.0, max(participation.values()), DELTA), rel=0.01)
    assert all_finite(summary)


def test_client_dp_server_adds_no_noise_of_its_own(client_mean):
    _, out = client_mean
    assert all("noise_std" not in r for r in checkpoint_rounds(out))


def test_client_dp_updates_carry_noise_of_std_two_sigma_c(client_mean):
    # The accountant assumes the replace-one sensitivity 2C of a clipped update, so the noise std
    # must be 2 sigma C (server.privacy.local_noise_std); sigma C would make the reported epsilon
    # that of sigma / 2. The server sees clip(u) + N(0, s^2 I_d): its norm lies within C of
    # s * sqrt(d), give or take a few s / sqrt(2). With s = 2 sigma C = 1 that is ~69.4 on digits'
    # 4810 parameters; with s = sigma C it would be ~34.7.
    summary, out = client_mean
    d = flat(torch.load(out / "model.pt", weights_only=True)).numel()
    std = 2 * SIGMA * CLIP
    for r in summary["rounds"]:
        for node, features in r["features"].items():
            assert abs(features["norm"] - std * math.sqrt(d)) <= CLIP + 6 * std / math.sqrt(2), (r["round"], node)


# --------------------------------------------------------------------------------------------
# 3 and 5. A privacy budget, with clipping in front of a robust rule
# --------------------------------------------------------------------------------------------


def rounds_within_budget(target: float, sigma: float, q: float, delta: float, limit: int) -> int:
    return max(r for r in range(limit + 1) if epsilon_for(sigma, q, r, delta) <= target)


def test_target_epsilon_stops_cleanly_before_the_round_that_would_exceed_it(central_trimmed_mean_with_budget):
    summary, out = central_trimmed_mean_with_budget
    k = rounds_within_budget(TARGET_EPSILON, SIGMA, 1.0, DELTA, BUDGETED["rounds"])
    assert 1 <= k < BUDGETED["rounds"], "the budget must cut the run short"
    assert [r["round"] for r in summary["rounds"]] == list(range(1, k + 1))
    assert summary["stopped_early"] is not None
    assert f"before round {k + 1}" in summary["stopped_early"] and "target-epsilon" in summary["stopped_early"]
    assert summary["privacy"]["epsilon"] <= TARGET_EPSILON
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilon_for(SIGMA, 1.0, k, DELTA), rel=0.01)
    assert (out / "model.pt").exists()
    assert torch.load(out / "model.pt", weights_only=True)
    assert load_checkpoint(out / "checkpoint.pt")["round"] == k
    assert len((out / "audit.jsonl").read_text().splitlines()) == k


def test_central_dp_clips_in_front_of_the_trimmed_mean_and_noises_its_sensitivity(central_trimmed_mean_with_budget):
    summary, out = central_trimmed_mean_with_budget
    n, f = BUDGETED["num-clients"], 2
    for r in checkpoint_rounds(out):
        # The scores see the clipped stack: no update is longer than C, and the bound binds.
        norms = [features["norm"] for features in r["features"].values()]
        assert max(norms) <= CLIP * (1 + 1e-6)
        assert max(norms) >= CLIP * 0.999
        assert r["noise_std"] == pytest.approx(SIGMA * 2 * CLIP / (n - 2 * f), rel=1e-9)
    assert summary["privacy"]["mode"] == "central" and summary["privacy"]["epsilon"] > 0
    assert all_finite(summary)


# --------------------------------------------------------------------------------------------
# 4. Rules without a sensitivity bound are refused under central DP
# --------------------------------------------------------------------------------------------


def test_bulyan_under_central_dp_is_refused_through_the_harness_with_a_pointer_to_client_dp(tmp_path):
    out = tmp_path / "bulyan"
    with pytest.raises(DPConfigError, match=r"'bulyan'.*dp=client"):
        run_federation(HONEST | {"num-clients": 8, "rounds": 2, "aggregator": "bulyan", "num-byzantine": 1,
                                 "dp": "central", "out": str(out)})
    assert not (out / "summary.json").exists()


def test_nnm_in_front_of_a_rule_under_central_dp_is_refused_before_any_round():
    settings = RunSettings(aggregator="trimmed-mean", num_byzantine=2, pre_aggregation="nnm", dp="central",
                           noise_multiplier=1.0, attack="none", num_malicious=0)
    with pytest.raises(DPConfigError, match=r"nnm.*dp=client"):
        build_strategy(settings, None)


def test_the_suggested_dp_client_accepts_the_same_rules():
    for rule, pre in (("bulyan", ""), ("trimmed-mean", "nnm")):
        settings = RunSettings(aggregator=rule, num_byzantine=1, pre_aggregation=pre, dp="client",
                               noise_multiplier=1.0, attack="none", num_malicious=0)
        assert build_strategy(settings, None).privacy.mode == "client"


# --------------------------------------------------------------------------------------------
# Budget edge cases (the server loop, no federation: no round is reached, so no Grid is used)
# --------------------------------------------------------------------------------------------


def test_the_first_budget_check_uses_the_runs_sampling_rate():
    one_round_sampled = epsilon_for(1.0, 0.5, 1, DELTA)
    one_round_everyone = epsilon_for(1.0, 1.0, 1, DELTA)
    assert one_round_sampled < one_round_everyone
    settings = RunSettings(num_clients=8, fraction_train=0.5, aggregator="mean", num_byzantine=0, pre_aggregation="", dp="central",
                           noise_multiplier=1.0, delta=DELTA,
                           target_epsilon=(one_round_sampled + one_round_everyone) / 2,
                           attack="none", num_malicious=0)
    assert not build_strategy(settings, None).next_round_exceeds_budget()


def test_a_budget_too_small_for_one_round_ends_cleanly_with_no_rounds(tmp_path):
    settings = RunSettings(aggregator="mean", num_byzantine=0, pre_aggregation="", dp="central", noise_multiplier=1.0, delta=DELTA,
                           target_epsilon=epsilon_for(1.0, 1.0, 1, DELTA) / 2, rounds=3, attack="none",
                           num_malicious=0, out=str(tmp_path / "run"))
    summary = run_server(None, settings)  # type: ignore[arg-type]  # no round runs, so no Grid is needed
    assert summary["rounds"] == [] and "before round 1" in summary["stopped_early"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stopped_early"] == summary["stopped_early"]
    assert (tmp_path / "run" / "model.pt").exists()


def test_a_round_with_clipping_but_no_noise_can_be_audited(tmp_path):
    settings = RunSettings(aggregator="mean", num_byzantine=0, pre_aggregation="", dp="central", noise_multiplier=0.0)
    record = {"round": 1, "accuracy": 0.9, "loss": 0.3, "epsilon": epsilon_for(0.0, 1.0, 1, DELTA)}
    assert math.isinf(record["epsilon"])
    AuditLog(tmp_path / "audit.jsonl").append(RobustRun(build_strategy(settings, None)).audit_record(record))
    written = json.loads((tmp_path / "audit.jsonl").read_text())
    # No finite number may stand for "no privacy at all".
    assert not isinstance(written["epsilon"], (int, float)) or math.isinf(written["epsilon"])
