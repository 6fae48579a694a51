"""The docs/results.md grid: every attack in the library x the rules x 5 seeds, and the recipe beside them.

``python -m simulations sweep`` varies the rule and its pre-aggregation per cell but keeps every
other key sweep-wide, so the grid is two sweeps:

* ``OUT/rules``: the rules, each told f = 4, under plain settings (no pre-aggregation unless the
  rule's name has one, ``policy = flag``, no rollback, the plain server step, no data audit);
* ``OUT/recipe``: the recommended recipe, i.e. the defaults of ``[tool.flwr.app.config]``
  (written out on its command line, so that the sweep says what it ran);

and ``merge`` puts both in ``OUT/merged`` (the cells linked, the recipe's named ``recipe``), where
``simulations.sweep.write_outputs`` writes one results.csv, heatmap.png, curves.png and
results.md for all of it::

    python benchmarks/results_grid.py run --out runs/results --jobs 2        # resumable, hours
    python benchmarks/results_grid.py merge --out runs/results [--images docs/images]

Scenario: digits, 20 clients with a Dirichlet(alpha) label split (``--alpha``, default 0.5), 4
attackers (``num-malicious``; for ``corrupted-source`` the honest clients whose data source is
corrupted), 20 rounds, seeds 0-4; attack parameters the attacks' defaults except sign-flip x10 and
``corrupted-source`` with ``mode=trigger``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.recipe_search import ATTACK_PARAMS, PLAIN, library_attacks  # noqa: E402

#: The rules of the grid: the nine of the earlier docs/results.md, then FLAME and FoolsGold.
RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geometric-median", "centered-clipping",
         "nnm+trimmed-mean", "flame", "foolsgold")
#: The recipe's column name in the merged tables.
RECIPE = "recipe"
#: The defence keys a recipe sets (the sweep passes them explicitly).
DEFENCE_KEYS = tuple(k for k in PLAIN if k not in ("aggregator", "pre-aggregation"))


def scenario(alpha: float) -> dict[str, Any]:
    """The federation every cell runs (besides the attack, the rule and the seed)."""
    return {"num-clients": 20, "num-malicious": 4, "rounds": 20, "alpha": alpha}


def recipe_keys() -> dict[str, Any]:
    """The recipe: the defence keys of ``[tool.flwr.app.config]``."""
    from simulations.harness import default_config

    defaults = default_config()
    return {k: defaults[k] for k in PLAIN}


def sweep_command(out: Path, aggregators: str, settings: dict[str, Any], seeds: str, jobs: int) -> list[str]:
    """The ``python -m simulations sweep`` command line of one half of the grid."""
    command = [sys.executable, "-m", "simulations", "sweep", "--attacks", ",".join(library_attacks()),
               "--aggregators", aggregators, "--seeds", seeds, "--jobs", str(jobs), "--attack-params", ATTACK_PARAMS,
               "--out", str(out)]
    for key, value in settings.items():
        command += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return command


def run(out: Path, seeds: str, jobs: int, alpha: float, parts: list[str]) -> int:
    """Run the two sweeps (each resumable); returns how many reported failed cells."""
    plain = {k: v for k, v in PLAIN.items() if k in DEFENCE_KEYS} | {"num-byzantine": 4, "pre-aggregation": ""}
    recipe = recipe_keys()
    chain = "+".join([*(s.strip() for s in str(recipe["pre-aggregation"]).split(",") if s.strip()),
                      recipe["aggregator"]])
    halves = {"rules": (",".join(RULES), scenario(alpha) | plain),
              RECIPE: (chain, scenario(alpha) | {k: v for k, v in recipe.items() if k in DEFENCE_KEYS})}
    failures = 0
    for name in parts:
        aggregators, settings = halves[name]
        command = sweep_command(out / name, aggregators, settings, seeds, jobs)
        print(" ".join(command[1:]), flush=True)
        failures += subprocess.run(command, check=False).returncode != 0
    return failures


def merge(out: Path, images: Path | None) -> dict[str, Path]:
    """Link both halves' cells into ``out/merged`` and write the tables and figures of the whole grid."""
    from simulations.sweep import write_outputs

    rules_spec = json.loads((out / "rules" / "sweep.json").read_text())
    recipe_spec = json.loads((out / RECIPE / "sweep.json").read_text())
    (recipe_chain,) = recipe_spec["aggregators"]
    merged = out / "merged"
    cells = merged / "cells"
    if cells.exists():
        shutil.rmtree(cells)
    cells.mkdir(parents=True)
    for cell in (out / "rules" / "cells").iterdir():
        (cells / cell.name).symlink_to(cell.resolve(), target_is_directory=True)
    for cell in (out / RECIPE / "cells").iterdir():
        attack, aggregator, seed = cell.name.rsplit("__", 2)
        (cells / f"{attack}__{RECIPE}__{seed}").symlink_to(cell.resolve(), target_is_directory=True)
    spec = {"attacks": rules_spec["attacks"], "aggregators": [*rules_spec["aggregators"], RECIPE],
            "seeds": rules_spec["seeds"], "machine": rules_spec["machine"],
            "command": f"{rules_spec['command']}\n{recipe_spec['command']}\n"
                       f"# the recipe's cells ({recipe_chain} with the defaults' defence keys) are the column "
                       f"'{RECIPE}'"}
    (merged / "sweep.json").write_text(json.dumps(spec, indent=2))
    written = write_outputs(merged)
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written["heatmap"], images / "sweep-heatmap.png")
        shutil.copyfile(written["curves"], images / "sweep-curves.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--out", type=Path, required=True)
    run_parser.add_argument("--seeds", default="0,1,2,3,4")
    run_parser.add_argument("--jobs", type=int, default=2)
    run_parser.add_argument("--alpha", type=float, default=0.5)
    run_parser.add_argument("--parts", default=f"rules,{RECIPE}", help=f"comma list of rules,{RECIPE}")
    merge_parser = commands.add_parser("merge")
    merge_parser.add_argument("--out", type=Path, required=True)
    merge_parser.add_argument("--images", type=Path, default=None, help="copy heatmap and curves here (docs/images)")
    args = parser.parse_args(argv)
    if args.command == "run":
        return 1 if run(args.out, args.seeds, args.jobs, args.alpha, args.parts.split(",")) else 0
    written = merge(args.out, args.images)
    print("\n".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
