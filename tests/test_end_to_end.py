"""End to end on Flower's simulation engine: real ServerApp, real ClientApps, real training.

Specification (digits, 10 IID clients): with no attack the mean reaches >= 0.90 in 10 rounds.
With 3 of 10 clients sending sign-flipped updates scaled by 10, the mean collapses below 0.5
while the coordinate median and the trimmed mean stay within 5 points of the no-attack run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simulations.harness import run_federation

from conftest import PLAIN

SURFACE_KEYS = {"config", "final_accuracy", "best_accuracy", "clean_accuracy", "backdoor_asr", "detection",
                "privacy", "wall_seconds", "rounds"}
ROUND_KEYS = {"round", "accuracy", "loss", "accepted", "rejected", "scores"}
ATTACK = {"attack": "sign-flip", "attack-params": "scale=10", "num-malicious": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, clean_mean_run):
    """The federations the relations below compare (about 15 s each on 2 cores)."""
    root = tmp_path_factory.mktemp("e2e")
    clean = clean_mean_run
    attacked = {
        rule: run_federation({"aggregator": rule, "num-byzantine": 3, "rounds": 10, "out": str(root / rule), **ATTACK, **PLAIN})
        for rule in ("mean", "median", "trimmed-mean")
    }
    return root, clean, attacked


def test_without_attack_the_mean_learns_digits(runs):
    _, clean, _ = runs
    assert clean["final_accuracy"] >= 0.90
    assert [r["round"] for r in clean["rounds"]] == list(range(1, 11))


def test_sign_flip_attackers_break_the_mean(runs):
    _, _, attacked = runs
    assert attacked["mean"]["final_accuracy"] < 0.5


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_hold_within_five_points_of_the_clean_run(runs, rule):
    _, clean, attacked = runs
    assert attacked[rule]["final_accuracy"] >= clean["final_accuracy"] - 0.05


def test_summary_has_the_surface_keys_and_per_round_evidence(runs):
    root, _, attacked = runs
    summary = json.loads((root / "trimmed-mean" / "summary.json").read_text())
    assert SURFACE_KEYS <= set(summary)
    assert summary["config"]["aggregator"] == "trimmed-mean" and summary["config"]["num-malicious"] == 3
    for record in summary["rounds"]:
        assert ROUND_KEYS <= set(record)
        assert len(record["accepted"]) == 10 and record["rejected"] == {}
        assert set(record["scores"]) == {str(n) for n in record["accepted"]}
    # the three attackers are known to the simulation and scored as the most anomalous
    assert len(summary["malicious_nodes"]) == 3
    assert summary["detection"]["auroc"] >= 0.95


def test_the_audit_trail_of_a_run_verifies(runs):
    root, _, _ = runs
    audit = root / "median" / "audit.jsonl"
    assert len(audit.read_text().splitlines()) == 10
    ok = subprocess.run([sys.executable, "-m", "server.audit", "verify", str(audit)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    lines = audit.read_text().splitlines()
    lines[4] = lines[4].replace('"round":5', '"round":6')
    audit.write_text("\n".join(lines) + "\n")
    bad = subprocess.run([sys.executable, "-m", "server.audit", "verify", str(audit)], capture_output=True, text=True)
    assert bad.returncode == 1 and ":5:" in bad.stderr


def test_same_seed_gives_the_same_numbers(runs, tmp_path):
    """Reproducibility: a short cell run twice on CPU gives identical per-round accuracies."""
    config = {"aggregator": "krum", "num-byzantine": 2, "rounds": 3, "alpha": 0.5, **ATTACK}
    first = run_federation(config | {"out": str(tmp_path / "a")})
    second = run_federation(config | {"out": str(tmp_path / "b")})
    assert [r["accuracy"] for r in first["rounds"]] == [r["accuracy"] for r in second["rounds"]]
    assert [r["loss"] for r in first["rounds"]] == [r["loss"] for r in second["rounds"]]
