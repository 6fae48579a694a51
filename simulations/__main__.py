"""Experiment command line: ``python -m simulations run|sweep ...``.

``run`` trains one federation (any attack, any aggregator) and writes DIR/summary.json,
DIR/audit.jsonl and DIR/scores.csv; ``sweep`` runs the grid attacks x aggregators x seeds.
Every run-config key is an option with the same name (``--num-malicious 2``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from simulations.harness import default_config, run_federation


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
    summary = run_federation(overrides, verbose=args.verbose)
    out = Path(summary["config"]["out"])
    if args.clean_baseline:
        clean_out = out / "clean"
        clean = run_federation(overrides | {"attack": "none", "num-malicious": 0, "out": str(clean_out)},
                               verbose=args.verbose)
        summary["clean_accuracy"] = clean["final_accuracy"]
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
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
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")

    sweep = commands.add_parser("sweep", help="run the grid attacks x aggregators x seeds")
    _add_config_options(sweep, defaults, skip=("attack", "aggregator", "seed"))
    sweep.add_argument("--attacks", required=True, help="comma list of attack names ('none' for no attack)")
    sweep.add_argument("--aggregators", required=True,
                       help="comma list of aggregator names; 'nnm+trimmed-mean' puts pre-aggregation in front")
    sweep.add_argument("--seeds", default="0", help="comma list of seeds (default: 0)")
    sweep.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")

    args = parser.parse_args(argv)
    if args.command == "run":
        return run_command(args, defaults)
    from simulations.sweep import sweep_command

    return sweep_command(args, defaults, _overrides(args, defaults))


if __name__ == "__main__":
    sys.exit(main())
