"""Checkpoint and resume: a server killed with SIGKILL mid-run loses at most one round.

Specification: a run killed by ``kill -9`` between rounds resumes from its last checkpoint
(``resume=true``) and ends with exactly the model of an uninterrupted run with the same seed;
its audit trail stays one intact chain with one record per round.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from server.audit import verify
from server.checkpoint import load_checkpoint
from simulations.harness import run_federation

ROUNDS = 25
CONFIG = {"aggregator": "trimmed-mean", "num-byzantine": 2, "attack": "sign-flip", "attack-params": "scale=10",
          "num-malicious": 2, "rounds": ROUNDS, "alpha": 0.5}


def audit_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_mid_run(out: Path, after_rounds: int = 3, timeout: float = 240.0) -> int:
    """Start a run in its own process group, SIGKILL the whole group after some rounds; return rounds done."""
    command = [sys.executable, "-m", "simulations", "run", "--out", str(out)]
    for key, value in CONFIG.items():
        command += [f"--{key}", str(value)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while audit_lines(out / "audit.jsonl") < after_rounds:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    return audit_lines(out / "audit.jsonl")


def test_a_killed_server_resumes_and_ends_with_the_uninterrupted_model(tmp_path):
    reference = run_federation(CONFIG | {"out": str(tmp_path / "reference")})

    killed = tmp_path / "killed"
    rounds_at_kill = kill_mid_run(killed)
    assert rounds_at_kill < ROUNDS
    checkpoint = load_checkpoint(killed / "checkpoint.pt")
    assert checkpoint["round"] >= rounds_at_kill - 1, "at most one round is lost"

    resumed = run_federation(CONFIG | {"resume": True, "out": str(killed)})

    assert [r["round"] for r in resumed["rounds"]] == list(range(1, ROUNDS + 1))
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in reference["rounds"]]
    final = torch.load(killed / "model.pt")
    expected = torch.load(tmp_path / "reference" / "model.pt")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    result = verify(killed / "audit.jsonl")
    assert result.ok and result.records == ROUNDS, result.reason
