"""quickstart-phalanx: a Flower ServerApp of its own, with Phalanx's RobustStrategy and RobustRun.

Compared with Flower's quickstart-pytorch server_app.py, two lines change: ``RobustStrategy``
in place of ``FedAvg``, and ``RobustRun(strategy, out_dir).start(...)`` in place of
``strategy.start(...)`` to get Phalanx's audit trail, checkpoints (``resume``), training
monitor, anomaly scores and review report in ``out``.
"""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from quickstart.task import Net, load_centralized_dataset, test
from server.run import RobustRun
from server.strategy import RobustStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Robust federated training of the quickstart CNN."""
    config = context.run_config
    torch.manual_seed(0)
    global_model = Net()
    strategy = RobustStrategy(
        aggregator=config["aggregator"],
        num_byzantine=config["num-byzantine"],
        fraction_train=config["fraction-train"],
        fraction_evaluate=config["fraction-evaluate"],
    )
    run = RobustRun(strategy, out_dir=config["out"], config=dict(config))
    result = run.start(
        grid=grid,
        initial_arrays=ArrayRecord(global_model.state_dict()),
        train_config=ConfigRecord({"lr": config["lr"]}),
        num_rounds=config["num-server-rounds"],
        evaluate_fn=global_evaluate,
    )
    print("\nFinal train metrics per round:", {r: dict(m) for r, m in result.train_metrics_clientapp.items()})
    print("Federated evaluation per round:", {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()})
    print("Central evaluation per round:", {r: dict(m) for r, m in result.evaluate_metrics_serverapp.items()})
    torch.save(result.arrays.to_torch_state_dict(), f"{config['out']}/final_model.pt")


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Evaluate the global model on the server's held-out set."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(model, load_centralized_dataset(), torch.device("cpu"))
    return MetricRecord({"accuracy": accuracy, "loss": loss})
