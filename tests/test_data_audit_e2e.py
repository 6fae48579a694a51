"""The client-side data audit against a compromised data source.

Specification: the simulated ``corrupted-source`` attack (an honest client's own data source
tampered with) is found by the audit with precision and recall >= 0.8 on digits partitions;
with ``data-audit = drop`` a federation whose training labels are 30% silently corrupted at
the source ends within 3 points of the clean run (mean aggregator), and better than with the
audit off.
"""

from __future__ import annotations

import numpy as np
import pytest

from client.data import load_partition
from client.data_audit import audit_dataset
from simulations.attacks import build
from simulations.harness import run_federation

from conftest import PLAIN


@pytest.mark.parametrize("mode", ["flip", "trigger"])
def test_the_audit_finds_what_the_corrupted_source_changed(mode):
    fraction = 0.2 if mode == "flip" else 0.05
    attack = build("corrupted-source", fraction=fraction, mode=mode, target=3)
    precisions, recalls = [], []
    for partition_id in range(4):
        data = load_partition("digits", partition_id, 8, 0.0, 0)
        x, y, changed = attack.poison_data_indexed(data.x, data.y, num_classes=10, image_shape=(8, 8),
                                                   rng=np.random.default_rng(partition_id))
        report = audit_dataset(x, y, num_classes=10, image_shape=(8, 8), feature_range=(0.0, 1.0))
        found = set(report.flagged_indices.tolist())
        hits = len(found & set(changed.tolist()))
        precisions.append(hits / max(len(found), 1))
        recalls.append(hits / len(changed))
    print(f"{mode}: precision {precisions}, recall {recalls}")
    assert np.mean(precisions) >= 0.8 and np.mean(recalls) >= 0.8


def test_dropping_flagged_samples_recovers_a_corrupted_federation(clean_mean_run, tmp_path):
    """30% of every client's labels flipped at the source; the audit drops what it flags."""
    summary = run_federation({"aggregator": "mean", "num-byzantine": 0, "rounds": 10, "attack": "corrupted-source",
                              "attack-params": "fraction=0.3", "num-malicious": 10, "data-audit": "drop",
                              "out": str(tmp_path / "drop"), **PLAIN})
    print(f"clean {clean_mean_run['final_accuracy']:.4f}, 30% flipped + audit drop {summary['final_accuracy']:.4f}")
    assert summary["final_accuracy"] >= clean_mean_run["final_accuracy"] - 0.03
    reports = summary["rounds"][0]["client_reports"]
    assert len(reports) == 10
    # about 30% of each partition is corrupted, and that is about what goes
    assert all(0.2 <= r["audit-dropped"] / r["audit-checked"] <= 0.45 for r in reports.values())


def test_dropping_flagged_samples_removes_a_backdoor_planted_at_the_source(tmp_path):
    """A trigger stamped on 10% of every client's data (relabelled to 3) plants a backdoor
    that the audit, dropping what it flags, keeps out of the model."""
    planted = {"aggregator": "mean", "num-byzantine": 0, "rounds": 10, "attack": "corrupted-source",
               "attack-params": "fraction=0.1,mode=trigger,target=3", "num-malicious": 10}
    off = run_federation(planted | {"data-audit": "off", "out": str(tmp_path / "off")})
    drop = run_federation(planted | {"data-audit": "drop", "out": str(tmp_path / "drop")})
    print(f"backdoor success rate: audit off {off['backdoor_asr']:.3f}, audit drop {drop['backdoor_asr']:.3f}")
    assert off["backdoor_asr"] >= 0.8
    assert drop["backdoor_asr"] <= 0.3
    assert drop["final_accuracy"] >= off["final_accuracy"] - 0.02
