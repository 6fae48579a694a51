"""Detection quality of the per-client anomaly score against known attackers.

Specification (digits, 20 IID clients, 4 attackers, 15 rounds, trimmed mean): for sign-flip,
scaling (x10), gaussian (std 1) and label-flip, the combined anomaly score separates attackers
from honest clients with AUROC >= 0.95, and the flags reach precision and recall >= 0.9
(over every (node, round) pair).
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


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attackers_are_detected(attack, tmp_path):
    summary = run_federation({"num-clients": 20, "num-malicious": 4, "num-byzantine": 4, "aggregator": "trimmed-mean",
                              "attack": attack, "attack-params": ATTACKS[attack], "rounds": 15,
                              "out": str(tmp_path / attack)})
    detection = summary["detection"]
    assert len(summary["malicious_nodes"]) == 4
    assert detection["auroc"] >= 0.95, detection
    assert detection["precision"] >= 0.9 and detection["recall"] >= 0.9, detection
