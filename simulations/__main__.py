"""Experiment command line: ``python -m simulations run|sweep ...``.

``run`` trains one federation (any attack, any aggregator) and writes DIR/summary.json,
DIR/audit.jsonl and DIR/scores.csv; ``sweep`` runs the grid attacks x aggregators x seeds.
Every run-config key is an option with the same name (``--num-malicious 2``). Both run on the
in-process engine unless ``--engine ray`` (Flower's simulation engine; ``--ray-address`` joins a
running Ray cluster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from simulations.harness import DEFAULT_ENGINE, ENGINES, default_config, run_federation
from simulations.progress import RoundProgress


def _add_config_options(parser: argparse.ArgumentParser, defaults: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("run config (defaults from pyproject.toml)")
    for key, value in defaults.items():
        if key in skip:
            continue
        kind = type(value)
        if kind is bool:
            group.add_argument(f"--{key}", type=_parse_bool, default=None, metavar="true|false",
                               help=f"(default: {str(value).lower()})")
        else:
            group.add_argument(f"--{key}", type=kind, default=None, help=f"(default: {value!r})")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in ("true", "1", "yes")


def _overrides(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    chosen = {}
    for key in defaults:
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None:
            chosen[key] = value
    return chosen


def run_command(args: argparse.Namespace, defaults: dict[str, Any]) -> int:
    """One federation, plus its no-attack twin when ``--clean-baseline`` is given."""
    overrides = _overrides(args, defaults)
    rounds = int(overrides.get("rounds", defaults["rounds"]))
    engine = {"engine": args.engine, "verbose": args.verbose, "ray_address": args.ray_address}
    # No live bar under --verbose: Flower's and Ray's logs would tear it.
    with RoundProgress(rounds, label="federation", enabled=not args.verbose) as progress:
        summary = run_federation(overrides, progress=progress, **engine)
    out = Path(summary["config"]["out"])
    if args.clean_baseline:
        clean_out = out / "clean"
        with RoundProgress(rounds, label="clean baseline", enabled=not args.verbose) as progress:
            clean = run_federation(overrides | {"attack": "none", "num-malicious": 0, "out": str(clean_out)},
                                   progress=progress, **engine)
        summary["clean_accuracy"] = clean["final_accuracy"]
        from server.run import write_json

        write_json(out / "summary.json", summary)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    print(f"\nfinal accuracy {_fmt(summary['final_accuracy'])} (best {_fmt(summary['best_accuracy'])})")
    if summary.get("clean_accuracy") is not None:
        print(f"clean accuracy {summary['clean_accuracy']:.4f}")
    if summary.get("backdoor_asr") is not None:
        print(f"backdoor attack success rate {summary['backdoor_asr']:.4f}")
    if summary.get("detection"):
        d = summary["detection"]
        print("detection: " + ", ".join(f"{k} {_fmt(d.get(k))}" for k in ("auroc", "precision", "recall")))
    if summary.get("privacy"):
        print(f"privacy: epsilon {_fmt(summary['privacy']['epsilon'])} at delta {summary['privacy']['delta']} "
              "(n/a: no noise, no guarantee)" if summary['privacy']['epsilon'] is None else
              f"privacy: epsilon {_fmt(summary['privacy']['epsilon'])} at delta {summary['privacy']['delta']}")
    print(f"wall time {summary['wall_seconds']:.1f} s; written to {summary['config']['out']}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                       help="inprocess: the ClientApp called in this process through a Flower Grid, on Flower's "
                            "wire form (no engine start-up); ray: Flower's simulation engine (default: %(default)s)")
    group.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="with --engine ray: join this running Ray cluster ('auto', or HOST:PORT of its head) "
                            "instead of starting Ray here")
    group.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (0: no limit), got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    defaults = default_config()
    parser = argparse.ArgumentParser(prog="python -m simulations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train one federation and write DIR/summary.json")
    _add_config_options(run, defaults)
    run.add_argument("--clean-baseline", action="store_true",
                     help="also run the same config without attack and report clean_accuracy")
    _add_engine_options(run)

    sweep = commands.add_parser("sweep", help="run the grid attacks x aggregators x seeds")
    _add_config_options(sweep, defaults, skip=("attack", "aggregator", "seed"))
    sweep.add_argument("--attacks", required=True, help="comma list of attack names ('none' for no attack)")
    sweep.add_argument("--aggregators", required=True,
                       help="comma list of aggregator names; 'nnm+trimmed-mean' puts pre-aggregation in front")
    sweep.add_argument("--seeds", default="0", help="comma list of seeds (default: 0)")
    sweep.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                       help="worker processes running cells at once (default: the CPU count; 1 with --engine ray)")
    sweep.add_argument("--shard", default=None, metavar="I/K",
                       help="run only cells I, I+K, I+2K... of the grid: K machines sharing --out split it")
    sweep.add_argument("--cell-timeout", type=_seconds, default=0.0, metavar="S",
                       help="a cell running longer is killed and recorded as failed (default: 0, no limit)")
    _add_engine_options(sweep)

    args = parser.parse_args(argv)
    if args.command == "run":
        return run_command(args, defaults)
    from simulations.sweep import sweep_command

    try:
        return sweep_command(args, defaults, _overrides(args, defaults))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: workers stopped, finished cells' tables written
        print("sweep interrupted: run the same command again to finish it (finished cells are kept)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
