"""The run directory is never lost: resume refuses what it cannot continue, starting afresh moves the old run aside.

Specification (real federations through the harness):
* ``resume=true`` with ``checkpoint.pt`` missing but ``audit.jsonl`` present refuses, naming both
  files, and leaves the log as it was;
* a checkpoint older than the log by more than one record (an older checkpoint of the same run),
  and a checkpoint copied from another run directory, are refused on resume;
* one record written after the last checkpoint (a crash between the two writes) is dropped on
  resume, and the resumed chain verifies;
* a fresh run in a directory holding an earlier run moves the earlier run's files to
  ``previous-runs/``: its audit log survives byte for byte;
* every JSON file a run writes parses with NaN and Infinity refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from server.audit import verify
from server.run import RunStateError
from simulations.harness import run_federation

from conftest import PLAIN

SHORT = {"aggregator": "median", "num-byzantine": 1, "attack": "sign-flip", "num-malicious": 2, "rounds": 3}


def _refuse_constant(name: str):
    raise ValueError(f"non-strict JSON constant {name}")


def strict_load(path: Path):
    return json.loads(path.read_text(), parse_constant=_refuse_constant)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_federation(SHORT | {"out": str(out)})
    return out


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_every_json_file_of_a_run_is_strict(finished):
    files = sorted(finished.rglob("*.json")) + sorted(finished.rglob("*.jsonl"))
    assert finished / "summary.json" in files
    for path in files:
        for line in (path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]):
            json.loads(line, parse_constant=_refuse_constant)


def test_resume_without_a_checkpoint_beside_a_log_is_refused_naming_both(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "checkpoint.pt").unlink()
    before = (run / "audit.jsonl").read_bytes()
    with pytest.raises(RunStateError, match=r"checkpoint\.pt is missing while .*audit\.jsonl holds 3 records"):
        run_federation(SHORT | {"rounds": 5, "resume": True, "out": str(run)})
    assert (run / "audit.jsonl").read_bytes() == before


def test_an_older_checkpoint_of_the_same_run_is_refused(tmp_path):
    out = tmp_path / "run"
    run_federation(SHORT | {"rounds": 1, "out": str(out)})
    old = (out / "checkpoint.pt").read_bytes()
    run_federation(SHORT | {"rounds": 3, "resume": True, "out": str(out)})
    (out / "checkpoint.pt").write_bytes(old)  # round 1's checkpoint beside a 3-record log
    with pytest.raises(RunStateError, match="older than the log"):
        run_federation(SHORT | {"rounds": 4, "resume": True, "out": str(out)})
    assert verify(out / "audit.jsonl").records == 3


def test_a_checkpoint_from_another_run_directory_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / "elsewhere")  # same settings, another directory
    with pytest.raises(RunStateError, match="written by another run"):
        run_federation(SHORT | {"rounds": 4, "resume": True, "out": str(run)})


def test_one_record_written_after_the_checkpoint_is_dropped_on_resume(tmp_path):
    out = tmp_path / "run"
    run_federation(SHORT | {"rounds": 2, "out": str(out)})
    checkpoint = (out / "checkpoint.pt").read_bytes()
    run_federation(SHORT | {"rounds": 3, "resume": True, "out": str(out)})
    (out / "checkpoint.pt").write_bytes(checkpoint)  # the crash: round 3 logged, its checkpoint lost
    summary = run_federation(SHORT | {"rounds": 4, "resume": True, "out": str(out)})
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]
    result = verify(out / "audit.jsonl")
    assert result.ok and result.records == 4


def test_a_fresh_run_moves_the_earlier_run_aside(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    earlier = (run / "audit.jsonl").read_bytes()
    run_federation(SHORT | {"rounds": 1, "out": str(run)})
    moved = list((run / "previous-runs").glob("*/audit.jsonl"))
    assert len(moved) == 1 and moved[0].read_bytes() == earlier
    assert verify(run / "audit.jsonl").records == 1


def test_a_round_that_makes_the_model_non_finite_is_not_kept(tmp_path):
    """One attacker scales its update by 1e35 under the plain mean with no norm bound: the
    aggregate overflows the model. The round is recorded with null metrics, the monitor alerts,
    the model goes back to the round's start, and the run goes on to the end."""
    out = tmp_path / "run"
    summary = run_federation({"aggregator": "mean", "num-byzantine": 0, "attack": "scaling",
                              "attack-params": "scale=1e35", "num-malicious": 1, "rounds": 3, "out": str(out), **PLAIN})
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    initial = summary["initial_evaluation"]
    for record in summary["rounds"]:
        assert "non-finite" in record["reverted"] and record["discarded_metrics"]["loss"] is None
        assert any("loss is nan" in alert or "loss is inf" in alert for alert in record["alerts"])
        # what is recorded is the model kept: the round's start, i.e. the initial model
        assert record["loss"] == initial["loss"] and record["accuracy"] == initial["accuracy"]
    strict_load(out / "summary.json")
    assert verify(out / "audit.jsonl").ok
    assert summary["final_accuracy"] == initial["accuracy"]


def test_rollback_undoes_a_late_attack_and_ends_near_the_clean_run(tmp_path, clean_mean_run):
    """Sign-flip attackers start after convergence (round 6 of 10) against the plain mean. Without
    rollback the mean collapses; with ``rollback-rounds = 1`` each alert restores the previous
    model and quarantines the flagged attackers, and the run ends within 2 points of clean."""
    late = PLAIN | {"aggregator": "mean", "num-byzantine": 0, "attack": "sign-flip", "attack-params": "scale=10",
            "num-malicious": 3, "attack-start-round": 6, "rounds": 10}
    broken = run_federation(late | {"out": str(tmp_path / "no-rollback")})
    assert broken["final_accuracy"] < clean_mean_run["final_accuracy"] - 0.2
    summary = run_federation(late | {"rollback-rounds": 1, "out": str(tmp_path / "rollback")})
    assert summary["rollbacks"] and summary["rollbacks"][0]["round"] == 6
    quarantined = set(summary["rollbacks"][0]["quarantined"])
    assert quarantined == set(summary["malicious_nodes"])
    assert summary["final_accuracy"] >= clean_mean_run["final_accuracy"] - 0.02
    audit = [json.loads(line) for line in (tmp_path / "rollback" / "audit.jsonl").read_text().splitlines()]
    assert audit[5]["rollback"]["restored_round"] == 5


def test_a_resumed_run_with_server_momentum_and_rollback_ends_with_the_uninterrupted_model(tmp_path):
    """The server optimizer's momentum and the rollback snapshots are in the checkpoint: a run
    stopped after round 2 and resumed to round 4 ends with the model of a run of 4 rounds."""
    import torch

    config = SHORT | {"server-optimizer": "sgd", "server-momentum": 0.5, "rollback-rounds": 1}
    reference = run_federation(config | {"rounds": 4, "out": str(tmp_path / "reference")})
    run_federation(config | {"rounds": 2, "out": str(tmp_path / "resumed")})
    resumed = run_federation(config | {"rounds": 4, "resume": True, "out": str(tmp_path / "resumed")})
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in reference["rounds"]]
    final = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    expected = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
