"""One task's federated rounds, timed: client training throughput and server round time.

    python benchmarks/task_round.py --task resnet18 --clients 10 --rounds 2 [--engine ...] [--out DIR]

Runs real rounds (the ClientApp's training, the ServerApp's validation, scoring and robust
aggregation) through ``simulations.harness.run_federation`` and prints, as a Markdown table:
per round, the wall seconds of the whole round, the server's aggregation seconds
(validate + stack + score + aggregate), and the clients' training throughput (samples per
second per client, from the ``train-seconds`` each client reports). On CUDA each client trains
on its share of the GPU; the machine and the command are printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="resnet18")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--aggregator", default="trimmed-mean")
    parser.add_argument("--num-byzantine", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--amp", action="store_true", help="mixed precision on the clients")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from simulations.harness import run_federation

    out = args.out or tempfile.mkdtemp(prefix="phalanx-task-round-")
    config = {"task": args.task, "num-clients": args.clients, "rounds": args.rounds, "aggregator": args.aggregator,
              "num-byzantine": args.num_byzantine, "local-epochs": args.local_epochs,
              "batch-size": args.batch_size, "amp": args.amp, "pre-aggregation": "", "server-momentum": 0.0,
              "out": out}
    started = time.time()
    summary = run_federation(config)
    wall = time.time() - started
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, {device}, torch {torch.__version__}")
    print(f"command: python benchmarks/task_round.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print("| round | round s | aggregation s | client samples/s (median) | client train s (median) | accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for record in summary["rounds"]:
        reports = record.get("client_reports", {}).values()
        seconds = [r["train-seconds"] for r in reports if "train-seconds" in r]
        sizes = {n: r for n, r in record.get("client_reports", {}).items()}
        rates = []
        for node, report in sizes.items():
            if "train-seconds" in report and report["train-seconds"] > 0:
                samples = _samples(summary, node) * args.local_epochs
                if samples:
                    rates.append(samples / report["train-seconds"])
        row = {"round": record["round"], "round_seconds": record["seconds"],
               "aggregation_seconds": record.get("aggregation_seconds"),
               "client_samples_per_second": statistics.median(rates) if rates else None,
               "client_train_seconds": statistics.median(seconds) if seconds else None,
               "accuracy": record.get("accuracy")}
        rows.append(row)
        print(f"| {row['round']} | {row['round_seconds']:.2f} | {_fmt(row['aggregation_seconds'])} | "
              f"{_fmt(row['client_samples_per_second'], 1)} | {_fmt(row['client_train_seconds'])} | "
              f"{_fmt(row['accuracy'], 3)} |")
    print(f"\nwhole run {wall:.1f} s (start-up included); run directory {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, "device": device, "rows": rows, "wall": wall},
                                              indent=2))
    return 0


def _samples(summary: dict, node: str) -> int | None:
    """Examples the node trained on (its partition), from the task's partition sizes."""
    from client.task import load_task

    config = summary["config"]
    task = load_task(config["task"])
    for record in summary["rounds"]:
        report = record.get("client_reports", {}).get(node, {})
        if "partition-id" in report:
            return len(task.load_partition(report["partition-id"], config["num-clients"], config))
    return None


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
