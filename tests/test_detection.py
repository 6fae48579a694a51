"""Detection quality of the per-client anomaly score against known attackers.

Specification (digits, 20 IID clients, 4 attackers, 15 rounds, trimmed mean): for sign-flip,
scaling (x10), gaussian (std 1) and label-flip, the combined anomaly score separates attackers
from honest clients with AUROC >= 0.95, and the flags reach precision and recall >= 0.9
(over every (node, round) pair).

Under label skew (a pinned Dirichlet(0.3) split of 20 clients, seed 0, 20 rounds, trimmed mean
told f = 4): with no attacker at most 1.5% of the honest (node, round) pairs are flagged (the
score before issue 16 flagged 15 of 400 pairs, 3.75%: the same few honest clients with big
updates, round after round), and the blatant attacks (sign-flip x10, scaling x10, gaussian,
IPM) keep AUROC >= 0.95 with recall >= 0.85.
"""

from __future__ import annotations

import pytest

from simulations.harness import run_federation

ATTACKS = {
    "sign-flip": "scale=10",
    "scaling": "scale=10",
    "gaussian": "std=1.0",
    "label-flip": "",
}
#: The defence of these specifications, spelled out so that they do not follow the defaults.
TRIMMED_MEAN = {"aggregator": "trimmed-mean", "num-byzantine": 4, "pre-aggregation": "", "policy": "flag",
                "rollback-rounds": 0, "server-momentum": 0.0}
#: The pinned non-IID scenario.
LABEL_SKEW = TRIMMED_MEAN | {"num-clients": 20, "alpha": 0.3, "seed": 0, "rounds": 20}
BLATANT = {"sign-flip": "scale=10", "scaling": "scale=10", "gaussian": "std=1.0", "ipm": ""}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attackers_are_detected(attack, tmp_path):
    summary = run_federation(TRIMMED_MEAN | {"num-clients": 20, "num-malicious": 4, "attack": attack,
                                             "attack-params": ATTACKS[attack], "rounds": 15,
                                             "out": str(tmp_path / attack)})
    detection = summary["detection"]
    assert len(summary["malicious_nodes"]) == 4
    assert detection["auroc"] >= 0.95, detection
    assert detection["precision"] >= 0.9 and detection["recall"] >= 0.9, detection


def test_honest_clients_under_label_skew_are_rarely_flagged(tmp_path):
    summary = run_federation(LABEL_SKEW | {"attack": "none", "num-malicious": 0, "out": str(tmp_path / "clean")})
    pairs = sum(len(r["scores"]) for r in summary["rounds"])
    flagged = sum(len(r["flagged"]) for r in summary["rounds"])
    assert pairs == 20 * 20
    assert flagged / pairs <= 0.015, [(r["round"], r["flagged"]) for r in summary["rounds"] if r["flagged"]]


@pytest.mark.parametrize("attack", sorted(BLATANT))
def test_blatant_attacks_are_detected_under_label_skew(attack, tmp_path):
    summary = run_federation(LABEL_SKEW | {"attack": attack, "attack-params": BLATANT[attack], "num-malicious": 4,
                                           "out": str(tmp_path / attack)})
    detection = summary["detection"]
    assert detection["auroc"] >= 0.95, detection
    assert detection["recall"] >= 0.85, detection
