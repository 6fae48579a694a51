"""Per-round overhead of Phalanx against a bare Flower FedAvg run of the same model and clients.

Both federations run on Flower's simulation engine in this process, with the same ClientApp
(``client.app:app``: same data, model and local training) and the same number of clients. The
bare server is Flower 1.42's own ``FedAvg`` strategy with no evaluation; the Phalanx server
validates every reply, scores every client, aggregates robustly, evaluates centrally, writes the
audit record, the checkpoint and summary.json each round. Round time = wall time between the
ends of consecutive rounds; the first round (actor start-up) is left out.

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

from simulations.harness import run_federation, simulate


def bare_flower_round_times(num_clients: int, rounds: int) -> list[float]:
    """Seconds per round of Flower's FedAvg over Phalanx's ClientApp."""
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from client.data import server_test_split
    from client.model import build_model

    ends: list[float] = []
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        test = server_test_split("digits")
        torch.manual_seed(0)
        arrays = ArrayRecord(build_model(test.num_features, test.num_classes).state_dict())
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=num_clients)

        def mark_round(server_round: int, _arrays: ArrayRecord) -> None:
            ends.append(time.perf_counter())

        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds, evaluate_fn=mark_round)

    simulate({"num-clients": num_clients, "num-malicious": 0, "attack": "none", "aggregator": "mean",
              "num-byzantine": 0, "rounds": rounds}, server_app=app)
    # ends[0] is the evaluation before round 1; round r ends at ends[r].
    return [b - a for a, b in zip(ends, ends[1:])]


def phalanx_round_times(num_clients: int, rounds: int, aggregator: str) -> list[float]:
    """Seconds per round of the full Phalanx server (from summary.json)."""
    with tempfile.TemporaryDirectory() as out:
        summary = run_federation({"num-clients": num_clients, "num-malicious": 0, "attack": "none",
                                  "aggregator": aggregator, "num-byzantine": 0 if aggregator == "mean" else 2,
                                  "rounds": rounds, "out": out})
    return [r["seconds"] for r in summary["rounds"]]


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
    print(f"\nratio of medians: {statistics.median(phalanx) / statistics.median(bare):.2f}x")


if __name__ == "__main__":
    main()
