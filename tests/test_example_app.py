"""examples/quickstart-phalanx: Phalanx inside a user's own Flower App, run by Flower's own runtime.

Specification: ``flwr run examples/quickstart-phalanx`` (a local simulation SuperLink, offline)
runs the example's own ServerApp (RobustStrategy + RobustRun) and ClientApp (Flower-template
style, its own CNN with BatchNorm) for its rounds; federated evaluation and the clients'
``train_loss`` reach the Result; the run directory holds Phalanx's evidence (summary, audit
chain that verifies, checkpoint, report, model); every process started is stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import flwr_env, processes_mentioning, stop_processes_mentioning

from server.audit import verify

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart-phalanx"


def test_the_quickstart_app_runs_with_phalanx_evidence(tmp_path):
    home = tmp_path / "flwr-home"
    out = tmp_path / "run"
    bin_dir = Path(sys.executable).parent
    env = flwr_env(home)
    try:
        completed = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(EXAMPLE), "--stream", "--federation-config", "num-supernodes=4",
             "--run-config", f"out={json.dumps(str(out))} num-server-rounds=2"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
        )
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    finally:
        stop_processes_mentioning(str(home))
    assert not processes_mentioning(str(home)), "flwr run left processes behind"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for record in summary["rounds"]:
        assert len(record["accepted"]) == 4 and record["train_loss"] is not None  # the template's train_loss
        assert record["federated_evaluation"]["accepted"], "fraction-evaluate 0.5 asked two clients"
        assert record["accuracy"] is not None
    assert verify(out / "audit.jsonl").ok
    for name in ("checkpoint.pt", "report.html", "model.pt", "final_model.pt", "scores.csv"):
        assert (out / name).exists(), name
    assert "Federated evaluation per round: {1:" in completed.stdout
