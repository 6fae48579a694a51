"""RobustStrategy in place of FedAvg in a user's own ServerApp, with Flower's conventions.

Specification (the quickstart example's own ClientApp on the in-process Flower engine; the
ServerApp is Flower's quickstart one with ``RobustStrategy`` instead of ``FedAvg``):
``strategy.start(...)`` returns Flower's ``Result`` with the clients' train metrics aggregated
(their own ``train_loss`` included, num-examples weighted), federated evaluation metrics from the
``fraction_evaluate`` share of clients, and ``evaluate_fn``'s central metrics for round 0 and
every round; a user's ``train_metrics_aggr_fn`` replaces the default.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import ServerApp

from server.strategy import RobustStrategy
from simulations.inprocess import run_inprocess

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart-phalanx"
CONFIG = {"num-server-rounds": 2, "fraction-train": 1.0, "fraction-evaluate": 0.5, "local-epochs": 1, "lr": 0.05,
          "batch-size": 32, "aggregator": "median", "num-byzantine": 1, "out": ""}


@pytest.fixture(scope="module")
def quickstart():
    sys.path.insert(0, str(EXAMPLE))
    import quickstart.client_app
    import quickstart.task

    yield quickstart
    sys.path.remove(str(EXAMPLE))


def user_server_app(results: list, task, **strategy_kwargs) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid, context):
        torch.manual_seed(0)
        strategy = RobustStrategy(aggregator="median", num_byzantine=1, fraction_evaluate=0.5, min_available_nodes=4,
                                  **strategy_kwargs)

        def central(server_round, arrays):
            model = task.Net()
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, accuracy = task.test(model, task.load_centralized_dataset(), torch.device("cpu"))
            return MetricRecord({"loss": loss, "accuracy": accuracy})

        results.append(strategy.start(grid, ArrayRecord(task.Net().state_dict()), num_rounds=2,
                                      train_config=ConfigRecord({"lr": 0.05}), evaluate_fn=central))

    return app


def test_robust_strategy_start_keeps_flowers_result_and_conventions(quickstart, tmp_path):
    results: list = []
    run_inprocess(user_server_app(results, quickstart.task), quickstart.client_app.app, CONFIG, num_nodes=4, seed=0,
                  app_dir=str(EXAMPLE))
    result = results[0]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert "train_loss" in result.train_metrics_clientapp[1] and result.train_metrics_clientapp[1]["num-valid"] == 4
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    assert {"eval_loss", "eval_acc"} <= set(result.evaluate_metrics_clientapp[1])
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
    assert result.evaluate_metrics_serverapp[2]["accuracy"] > result.evaluate_metrics_serverapp[0]["accuracy"]
    assert set(result.arrays.to_torch_state_dict()) == set(quickstart.task.Net().state_dict())


def test_a_users_metrics_aggregation_function_replaces_the_default(quickstart):
    seen: list = []

    def worst_loss(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
        losses = [next(iter(r.metric_records.values()))["train_loss"] for r in records]
        seen.append(weighting_metric_name)
        return MetricRecord({"worst_train_loss": max(losses)})

    results: list = []
    run_inprocess(user_server_app(results, quickstart.task, train_metrics_aggr_fn=worst_loss),
                  quickstart.client_app.app, CONFIG, num_nodes=4, seed=0, app_dir=str(EXAMPLE))
    assert seen == ["num-examples", "num-examples"]
    assert set(results[0].train_metrics_clientapp[1]) == {"worst_train_loss", "num-valid", "num-rejected"}
