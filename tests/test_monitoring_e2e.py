"""Client reputation and training monitoring, end to end on the simulation engine.

Specification: under the ``quarantine`` policy a scaling attacker is out of the aggregate by
round 5 and the final accuracy is within 2 points of the no-attack run; a sudden loss jump (an
attack that starts mid-training against the plain mean) raises a monitor alert in that round.
"""

from __future__ import annotations

import json

import pytest

from simulations.harness import run_federation

#: The plain mean, every defence key spelled out: these specifications are about the monitor and the
#: quarantine policy, not about the defaults' recipe.
BASE = {"aggregator": "mean", "num-byzantine": 0, "pre-aggregation": "", "policy": "flag", "rollback-rounds": 0,
        "server-optimizer": "sgd", "server-lr": 1.0, "server-momentum": 0.0, "data-audit": "off", "rounds": 10}


@pytest.fixture
def clean(clean_mean_run):
    return clean_mean_run


def test_quarantine_excludes_a_scaling_attacker_and_keeps_accuracy(clean, tmp_path):
    summary = run_federation(BASE | {"attack": "scaling", "attack-params": "scale=10", "num-malicious": 1,
                                     "policy": "quarantine", "out": str(tmp_path / "run")})
    (attacker,) = summary["malicious_nodes"]
    by_round = {r["round"]: r for r in summary["rounds"]}
    first_out = min(r for r, rec in by_round.items()
                    if attacker not in rec["accepted"] or attacker in rec.get("excluded", []))
    assert first_out <= 5
    assert attacker in by_round[1]["flagged"]
    assert summary["final_accuracy"] >= clean["final_accuracy"] - 0.02


def test_a_poisoned_round_raises_a_monitor_alert_in_that_round(clean, tmp_path):
    summary = run_federation(BASE | {"attack": "sign-flip", "attack-params": "scale=10", "num-malicious": 3,
                                     "attack-start-round": 6, "rounds": 7, "out": str(tmp_path / "run")})
    alert_rounds = sorted({a["round"] for a in summary["alerts"]})
    assert alert_rounds and alert_rounds[0] == 6, summary["alerts"]
    assert summary["rounds"][5]["alerts"], "the round record carries its alerts"
    audit = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    assert audit[5]["round"] == 6 and audit[5]["alerts"]
    assert not any(record["alerts"] for record in audit[:5])
