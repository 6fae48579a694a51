"""The recommended recipe: which defence configuration holds up against every attack in the library.

Issue 16: on non-IID digits (alpha 0.3 and 0.5, 20% attackers) the default configuration should
have a worst case over every attack within 3 points of the plain mean's clean accuracy, a clean
accuracy within 1 point of it, and a backdoor attack success of at most 5% for every backdoor
attack. Each recipe here is a full set of defence keys (every one given, so that the results do
not depend on the defaults of the day); ``run`` sweeps each recipe over every attack in the
library, ``report`` scores them against the three goals.

``run``::

    python benchmarks/recipe_search.py run --recipes mean,flame-tm4 --alphas 0.3,0.5 --seeds 0,1,2 \\
        --jobs 2 --out runs/recipe

    One ``python -m simulations sweep`` per (recipe, alpha) into ``OUT/<recipe>/alpha<a>``: the
    grid is every attack of ``simulations.attacks.available()`` plus ``none``, one aggregator
    (the recipe's chain), the recipe's keys sweep-wide. The sweep tool varies only the rule and
    the pre-aggregation per cell; ``num-byzantine``, ``policy``, ``rollback-rounds`` and the server
    optimizer are sweep-wide, hence one sweep per recipe.

``report``::

    python benchmarks/recipe_search.py report runs/recipe [--reference mean] [--json OUT]

    Per recipe and alpha: clean accuracy, worst case over attacks (and which), the highest
    backdoor success over the backdoor attacks (and which), each against the reference recipe's
    clean accuracy, means over the seeds that finished.

Attack settings are the attacks' defaults except sign-flip x10 (as in docs/results.md) and
``corrupted-source`` with ``mode=trigger`` (a backdoor planted at honest clients' data source).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: Attacks whose attack success rate the goal bounds (issue 16).
BACKDOOR_ATTACKS = ("backdoor", "model-replacement", "dba", "neurotoxin", "norm-bounded-backdoor", "corrupted-source")
#: Attack parameters of the grid.
ATTACK_PARAMS = "sign-flip:scale=10;corrupted-source:mode=trigger"
#: The federation every recipe is measured on (besides alpha and the seeds).
SCENARIO = {"num-clients": 20, "num-malicious": 4, "rounds": 20}
#: Every defence key, at the plain-FedAvg setting a recipe starts from.
PLAIN = {"aggregator": "mean", "pre-aggregation": "", "num-byzantine": 0, "policy": "flag", "flag-threshold": 0.5,
         "rollback-rounds": 0, "server-optimizer": "sgd", "server-lr": 1.0, "server-momentum": 0.0, "data-audit": "off"}


def recipe(**keys: Any) -> dict[str, Any]:
    """A full set of defence keys: :data:`PLAIN` with ``keys`` (underscores for dashes)."""
    return PLAIN | {k.replace("_", "-"): v for k, v in keys.items()}


#: The recipe the defaults of ``[tool.flwr.app.config]`` and ``RunSettings`` follow (docs/results.md says why).
DEFAULT_RECIPE = "flame-median-m5"
#: The recipes tried, by name.
RECIPES: dict[str, dict[str, Any]] = {
    "mean": recipe(),
    "trimmed-mean": recipe(aggregator="trimmed-mean", num_byzantine=4),
    "trimmed-mean-q": recipe(aggregator="trimmed-mean", num_byzantine=4, policy="quarantine"),
    "median": recipe(aggregator="median", num_byzantine=4),
    "flame": recipe(aggregator="flame"),
    "flame-tm4": recipe(aggregator="trimmed-mean", pre_aggregation="flame", num_byzantine=4),
    "flame-tm2": recipe(aggregator="trimmed-mean", pre_aggregation="flame", num_byzantine=2),
    "flame-tm4-q": recipe(aggregator="trimmed-mean", pre_aggregation="flame", num_byzantine=4, policy="quarantine"),
    "flame-tm2-q": recipe(aggregator="trimmed-mean", pre_aggregation="flame", num_byzantine=2, policy="quarantine"),
    "flame-median": recipe(aggregator="median", pre_aggregation="flame", num_byzantine=4),
    "flame-tm2-q-m5": recipe(aggregator="trimmed-mean", pre_aggregation="flame", num_byzantine=2,
                             policy="quarantine", server_momentum=0.5),
    # Wave 2 (screened on a subset of attacks first): more trimming, server momentum, the client audit.
    "flame-tm5": recipe(aggregator="trimmed-mean", pre_aggregation="flame", num_byzantine=5),
    "tm6": recipe(aggregator="trimmed-mean", num_byzantine=6),
    "tm8": recipe(aggregator="trimmed-mean", num_byzantine=8),
    "tm4-m5": recipe(aggregator="trimmed-mean", num_byzantine=4, server_momentum=0.5),
    "flame-tm4-m5": recipe(aggregator="trimmed-mean", pre_aggregation="flame", num_byzantine=4, server_momentum=0.5),
    "flame-tm4-m9": recipe(aggregator="trimmed-mean", pre_aggregation="flame", num_byzantine=4, server_momentum=0.9,
                           server_lr=0.5),
    "flame-tm4-audit": recipe(aggregator="trimmed-mean", pre_aggregation="flame", num_byzantine=4, data_audit="drop"),
    # The recommended recipe (DEFAULT_RECIPE). Neither FLAME nor the median takes f, so num-byzantine
    # only documents the expected share of attackers (2 of the default 10 clients); the cells measured
    # with num-byzantine 4 are the same cells.
    "flame-median-m5": recipe(aggregator="median", pre_aggregation="flame", num_byzantine=2, server_momentum=0.5),
    # Wave 3: FLAME's filter, the median and server momentum, with the client-side data audit.
    "flame-median-m5-audit": recipe(aggregator="median", pre_aggregation="flame", num_byzantine=4,
                                    server_momentum=0.5, data_audit="drop"),
    "flame-median-m7-audit": recipe(aggregator="median", pre_aggregation="flame", num_byzantine=4,
                                    server_momentum=0.7, data_audit="drop"),
    "flame-median-m5-audit-q": recipe(aggregator="median", pre_aggregation="flame", num_byzantine=4,
                                      server_momentum=0.5, data_audit="drop", policy="quarantine"),
    "flame-median-m5-audit-rb1": recipe(aggregator="median", pre_aggregation="flame", num_byzantine=4,
                                        server_momentum=0.5, data_audit="drop", rollback_rounds=1),
    "flame-tm5-m5-audit": recipe(aggregator="trimmed-mean", pre_aggregation="flame", num_byzantine=5,
                                 server_momentum=0.5, data_audit="drop"),
    # Wave 4 (alpha 0.3, the backdoors): how much momentum, clipping in front, no FLAME.
    "median-m5": recipe(aggregator="median", num_byzantine=4, server_momentum=0.5),
    "flame-median-m3": recipe(aggregator="median", pre_aggregation="flame", num_byzantine=4, server_momentum=0.3),
    "flame-median-m5-lr05": recipe(aggregator="median", pre_aggregation="flame", num_byzantine=4,
                                   server_momentum=0.5, server_lr=0.5),
    "clip1-flame-median-m5": recipe(aggregator="median", pre_aggregation="clip:norm=1,flame", num_byzantine=4,
                                    server_momentum=0.5),
    # Wave 5 (the whole library, 3 seeds): the closest ones, with quarantine and rollback.
    "flame-median-m5-q": recipe(aggregator="median", pre_aggregation="flame", num_byzantine=4, server_momentum=0.5,
                                policy="quarantine"),
    "flame-median-m5-q-rb1": recipe(aggregator="median", pre_aggregation="flame", num_byzantine=4,
                                    server_momentum=0.5, policy="quarantine", rollback_rounds=1),
}


def library_attacks() -> list[str]:
    """``none`` and every attack the library registers."""
    import simulations.attacks as attacks

    return ["none", *attacks.available()]


def chain_name(keys: dict[str, Any]) -> str:
    """The sweep's aggregator name of a recipe: pre-aggregation steps, then the rule, joined by ``+``."""
    steps = [step.strip() for step in str(keys["pre-aggregation"]).split(",") if step.strip()]
    return "+".join([*steps, keys["aggregator"]])


def run(out: Path, names: list[str], alphas: list[float], seeds: str, jobs: int, extra: dict[str, Any],
        attacks: str | None = None) -> int:
    """One sweep per (recipe, alpha); returns the number of sweeps that reported failed cells.

    ``attacks`` (a comma list) screens a recipe on some attacks first; default: the whole library.
    """
    failures = 0
    attacks = attacks or ",".join(library_attacks())
    # The sweep refuses parameters for attacks outside its grid.
    params = ";".join(item for item in ATTACK_PARAMS.split(";") if item.split(":")[0] in attacks.split(","))
    for name in names:
        keys = RECIPES[name]
        for alpha in alphas:
            # The chain's name carries the pre-aggregation; the sweep-wide value must still be given,
            # or a chain without one ("mean") would run behind the defaults' pre-aggregation.
            settings = SCENARIO | extra | {k: v for k, v in keys.items() if k != "aggregator"} | {"pre-aggregation": ""}
            command = [sys.executable, "-m", "simulations", "sweep", "--attacks", attacks,
                       "--aggregators", chain_name(keys), "--seeds", seeds, "--jobs", str(jobs),
                       "--attack-params", params, "--alpha", str(alpha),
                       "--out", str(out / name / f"alpha{alpha}")]
            for key, value in settings.items():
                command += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
            print(f"recipe {name}, alpha {alpha}: " + " ".join(command[1:]), flush=True)
            failures += subprocess.run(command, check=False).returncode != 0
    return failures


def read_results(directory: Path) -> list[dict[str, Any]]:
    """Rows of a sweep's results.csv with numbers parsed (cells that did not finish left out)."""
    path = directory / "results.csv"
    if not path.exists():
        return []
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["status"] != "ok":
                continue
            rows.append({"attack": row["attack"], "seed": int(row["seed"]),
                         "final_accuracy": float(row["final_accuracy"]),
                         "backdoor_asr": float(row["backdoor_asr"]) if row["backdoor_asr"] else None})
    return rows


def recipe_numbers(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Clean accuracy, worst case over attacks and the highest backdoor success, means over seeds."""
    by_attack: dict[str, list[dict]] = {}
    for row in rows:
        by_attack.setdefault(row["attack"], []).append(row)
    accuracy = {a: float(np.mean([r["final_accuracy"] for r in rs])) for a, rs in by_attack.items()}
    asr = {a: float(np.mean([r["backdoor_asr"] for r in rs])) for a, rs in by_attack.items()
           if a in BACKDOOR_ATTACKS and all(r["backdoor_asr"] is not None for r in rs)}
    attacked = {a: v for a, v in accuracy.items() if a != "none"}
    worst_attack = min(attacked, key=attacked.get) if attacked else None
    asr_attack = max(asr, key=asr.get) if asr else None
    return {"clean": accuracy.get("none"), "worst": attacked.get(worst_attack), "worst_attack": worst_attack,
            "max_asr": asr.get(asr_attack), "asr_attack": asr_attack, "attacks": len(attacked),
            "seeds": sorted({r["seed"] for r in rows}), "accuracy": accuracy, "asr": asr}


def report(out: Path, reference: str) -> list[dict[str, Any]]:
    """One row per (recipe, alpha) with the three goals measured against ``reference``'s clean accuracy."""
    rows = []
    for recipe_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        for alpha_dir in sorted(recipe_dir.glob("alpha*")):
            numbers = recipe_numbers(read_results(alpha_dir))
            rows.append({"recipe": recipe_dir.name, "alpha": float(alpha_dir.name[len("alpha"):])} | numbers)
    clean_reference = {r["alpha"]: r["clean"] for r in rows if r["recipe"] == reference}
    for row in rows:
        base = clean_reference.get(row["alpha"])
        row["reference_clean"] = base
        if base is None or row["clean"] is None or row["worst"] is None:
            row["goals"] = None
            continue
        row["goals"] = {"worst_within_3": row["worst"] >= base - 0.03, "clean_within_1": row["clean"] >= base - 0.01,
                        "asr_at_most_5": row["max_asr"] is not None and row["max_asr"] <= 0.05}
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The report as a markdown table."""
    lines = ["| recipe | alpha | seeds | clean | worst case (attack) | max backdoor ASR (attack) | "
             "gaps to the mean's clean: clean / worst | goals met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["clean"] is None or r["worst"] is None:
            lines.append(f"| {r['recipe']} | {r['alpha']:g} | {r['seeds']} | incomplete ({r['attacks']} attacks) "
                         "| | | | |")
            continue
        base = r["reference_clean"]
        gaps = "-" if base is None else f"{100 * (r['clean'] - base):+.1f} / {100 * (r['worst'] - base):+.1f}"
        met = "-" if r["goals"] is None else f"{sum(r['goals'].values())}/3"
        asr = "-" if r["max_asr"] is None else f"{r['max_asr']:.3f} ({r['asr_attack']})"
        lines.append(f"| {r['recipe']} | {r['alpha']:g} | {len(r['seeds'])} | {r['clean']:.3f} | "
                     f"{r['worst']:.3f} ({r['worst_attack']}) | {asr} | {gaps} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--recipes", required=True, help=f"comma list of {sorted(RECIPES)}")
    run_parser.add_argument("--alphas", default="0.3,0.5")
    run_parser.add_argument("--seeds", default="0")
    run_parser.add_argument("--jobs", type=int, default=2)
    run_parser.add_argument("--num-clients", type=int, default=SCENARIO["num-clients"])
    run_parser.add_argument("--num-malicious", type=int, default=SCENARIO["num-malicious"])
    run_parser.add_argument("--out", type=Path, required=True)
    run_parser.add_argument("--attacks", default=None, help="comma list (default: none and every library attack)")
    report_parser = commands.add_parser("report")
    report_parser.add_argument("out", type=Path)
    report_parser.add_argument("--reference", default="mean")
    report_parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "run":
        unknown = [n for n in args.recipes.split(",") if n not in RECIPES]
        if unknown:
            parser.error(f"unknown recipes {unknown}; known: {sorted(RECIPES)}")
        extra = {"num-clients": args.num_clients, "num-malicious": args.num_malicious}
        return 1 if run(args.out, args.recipes.split(","), [float(a) for a in args.alphas.split(",")], args.seeds,
                        args.jobs, extra, args.attacks) else 0
    rows = report(args.out, args.reference)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
