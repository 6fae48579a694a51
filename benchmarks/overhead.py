"""Per-round overhead of Phalanx against a bare Flower FedAvg run of the same model and clients.

Both federations run on Flower's simulation engine in this process, with the same ClientApp
(``client.app:app``: same data, model and local training) and the same number of clients. The
bare server is Flower 1.42's own ``FedAvg`` strategy with no evaluation; the Phalanx server
validates every reply, scores every client, aggregates robustly, evaluates centrally, writes the
audit record, the checkpoint and summary.json each round. Both servers are timed the same way:
their Grid is wrapped and a round is the wall time between consecutive ``send_and_receive``
calls, so everything a server does between two rounds counts (for Phalanx: aggregation,
evaluation, audit, checkpoint, summary). The first round (actor start-up) is left out.

Usage::

    python benchmarks/overhead.py --clients 10 --rounds 12 --aggregator trimmed-mean
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from simulations.harness import simulate


class TimedGrid:
    """A Grid that notes when each non-empty ``send_and_receive`` starts; the rest passes through."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.calls: list[float] = []

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        if messages:  # FedAvg with fraction_evaluate=0 still calls it, with no message, every round
            self.calls.append(time.perf_counter())
        return self._grid.send_and_receive(messages, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def round_times(self) -> list[float]:
        """Seconds from each round's send to the next round's send."""
        return [b - a for a, b in zip(self.calls, self.calls[1:])]


def bare_flower_round_times(num_clients: int, rounds: int) -> list[float]:
    """Seconds per round of Flower's FedAvg over Phalanx's ClientApp."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from client.task import load_task
    from client.wire import to_arrays

    timed: list[TimedGrid] = []
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        arrays = to_arrays(load_task("digits-mlp").build_model(dict(context.run_config)))
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=num_clients)
        timed.append(TimedGrid(grid))
        strategy.start(grid=timed[0], initial_arrays=arrays, num_rounds=rounds)

    simulate({"num-clients": num_clients, "num-malicious": 0, "attack": "none", "aggregator": "mean",
              "num-byzantine": 0, "rounds": rounds}, server_app=app)
    return timed[0].round_times()


def phalanx_round_times(num_clients: int, rounds: int, aggregator: str) -> list[float]:
    """Seconds per round of the full Phalanx server (``server.app.run_server``)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from server.app import run_server
    from server.settings import RunSettings

    timed: list[TimedGrid] = []
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        timed.append(TimedGrid(grid))
        run_server(timed[0], RunSettings.from_run_config(dict(context.run_config)))

    with tempfile.TemporaryDirectory() as out:
        simulate({"num-clients": num_clients, "num-malicious": 0, "attack": "none", "aggregator": aggregator,
                  "num-byzantine": 0 if aggregator == "mean" else 2, "rounds": rounds, "out": out},
                 server_app=app)
    return timed[0].round_times()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--aggregator", default="trimmed-mean")
    args = parser.parse_args()
    bare = bare_flower_round_times(args.clients, args.rounds)[1:]
    phalanx = phalanx_round_times(args.clients, args.rounds, args.aggregator)[1:]
    load = os.getloadavg()[0]
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}; load average {load:.1f}")
    print(f"command: python benchmarks/overhead.py {' '.join(sys.argv[1:])}\n")
    print("| server | rounds timed | median s/round | mean s/round |")
    print("| --- | --- | --- | --- |")
    print(f"| Flower FedAvg (bare) | {len(bare)} | {statistics.median(bare):.3f} | {statistics.mean(bare):.3f} |")
    print(f"| Phalanx ({args.aggregator}) | {len(phalanx)} | {statistics.median(phalanx):.3f} | "
          f"{statistics.mean(phalanx):.3f} |")
    print(f"\nratio of medians: {statistics.median(phalanx) / statistics.median(bare):.2f}x; "
          f"ratio of means: {statistics.mean(phalanx) / statistics.mean(bare):.2f}x")


if __name__ == "__main__":
    main()
