"""The same app on Flower's own runtime: ``flwr run .`` with a local simulation SuperLink.

Specification: offline (no runtime dependency installation, telemetry off), ``flwr run .``
runs Phalanx's ServerApp and ClientApp and reaches the accuracy band of the in-process harness
for the same config; every process it started is stopped afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import CLEAN_MEAN, flwr_env, processes_mentioning, stop_processes_mentioning

PROJECT = Path(__file__).resolve().parent.parent


def test_flwr_run_reaches_the_same_accuracy_band(tmp_path, clean_mean_run):
    home = tmp_path / "flwr-home"
    out = tmp_path / "run"
    bin_dir = Path(sys.executable).parent
    env = flwr_env(home)
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in CLEAN_MEAN.items()) + f" out={json.dumps(str(out))}"
    try:
        completed = subprocess.run(
            [str(bin_dir / "flwr"), "run", ".", "--stream", "--federation-config", "num-supernodes=10",
             "--run-config", overrides],
            cwd=PROJECT, env=env, capture_output=True, text=True, timeout=400,
        )
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
    finally:
        stop_processes_mentioning(str(home))
    assert not processes_mentioning(str(home)), "flwr run left processes behind"
    assert "round accuracy" in completed.stdout  # the per-round table, streamed from the ServerApp
    assert len(summary["rounds"]) == 10
    assert summary["final_accuracy"] >= 0.90
    assert abs(summary["final_accuracy"] - clean_mean_run["final_accuracy"]) <= 0.02
