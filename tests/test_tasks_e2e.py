"""Any model, any data, end to end: conv nets with BatchNorm and a user's own task module, attacked.

Specification (real federations, 10 clients, 2 sign-flip attackers, trimmed mean, f = 2):
``digits-cnn`` ends above 0.90 and ``images-cnn`` (the generated CIFAR-10-shaped images) above
0.80 after 6 rounds. Measured on the 2-core CPU: 0.967 and 0.913 (clean: 0.983 and 0.947).
A user's task module named by ``task = "package.module"`` trains end to end with Phalanx's
defaults and with its own loops, and its integer BatchNorm counters come back as integers.
"""

from __future__ import annotations

import torch

from client.task import load_task
from simulations.harness import run_federation

ATTACKED = {"aggregator": "trimmed-mean", "num-byzantine": 2, "attack": "sign-flip", "num-malicious": 2, "rounds": 6}


def test_digits_cnn_holds_against_sign_flip_attackers(tmp_path):
    summary = run_federation(ATTACKED | {"task": "digits-cnn", "out": str(tmp_path / "run")})
    assert summary["final_accuracy"] > 0.90
    assert summary["config"]["task"] == "digits-cnn" and summary["effective_config"]["lr"] == 0.1


def test_images_cnn_learns_the_generated_images_under_attack(tmp_path):
    summary = run_federation(ATTACKED | {"task": "images-cnn", "out": str(tmp_path / "run")})
    assert summary["final_accuracy"] > 0.80
    assert summary["detection"]["auroc"] >= 0.9
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    model = load_task("images-cnn").build_model({"dataset": "auto"})
    model.load_state_dict(state)  # model.pt loads into the task's own model
    counters = [k for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert counters and all(state[k].dtype == torch.int64 and int(state[k]) > 0 for k in counters)


def test_a_users_task_module_runs_end_to_end(tmp_path):
    for spec in ("tests.user_task", "tests.user_task:WithOwnLoops"):
        summary = run_federation({"task": spec, "num-clients": 4, "aggregator": "median", "num-byzantine": 1,
                                  "rounds": 3, "local-epochs": 2, "out": str(tmp_path / spec.replace(":", "_"))})
        assert summary["final_accuracy"] > 0.8, spec
        losses = [r["train_loss"] for r in summary["rounds"]]
        assert all(loss is not None for loss in losses), "train-loss or train_loss reaches the server"
