"""Honest false flags under label skew: how often honest non-IID clients are flagged and quarantined.

Issue 16, "fewer false quarantines". Two commands:

``run``
    One sweep per (alpha, policy): digits, 20 clients, 4 attackers (none for the clean row),
    trimmed mean told f = 4, 20 rounds, attacks none, sign-flip x10, scaling x10, gaussian, IPM,
    ALIE and label-flip, seeds 0, 1, 2::

        python benchmarks/false_flags.py run --out runs/false-flags --jobs 2

``report``
    Per alpha and attack, from the cells' ``summary.json``: the share of honest (node, round)
    pairs flagged, the honest nodes flagged at least once and (under ``policy = quarantine``)
    kept out at least once, which kind of evidence flagged them, and the attackers' AUROC and
    recall. ``--rescore`` scores the stored raw features again with the current
    :func:`server.scoring.score_features` and replays :class:`server.reputation.Reputation`
    (exact for ``policy = flag`` runs, where flags do not change the aggregate; the rule's scores
    are only stored as z-scores, which stand in for them)::

        python benchmarks/false_flags.py report runs/false-flags [--rescore] [--json OUT]

Sweeps run through ``python -m simulations sweep`` (its own resumable cells); this script only
chooses the grid and reads the cells.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.reputation import Reputation  # noqa: E402
from server.scoring import auroc, score_features  # noqa: E402

#: The attacks of the measurement: the clean row, the four blatant ones and three subtler ones.
ATTACKS = ("none", "sign-flip", "scaling", "gaussian", "ipm", "alie", "label-flip")
#: Attacks whose AUROC must stay >= 0.95 (issue 16).
BLATANT = ("sign-flip", "scaling", "gaussian", "ipm")
#: Settings shared by every cell (the attack and seed come from the sweep grid).
BASE = {"num-clients": 20, "num-malicious": 4, "num-byzantine": 4, "rounds": 20, "aggregator": "trimmed-mean",
        "attack-params": "sign-flip:scale=10", "pre-aggregation": "", "rollback-rounds": 0,
        "server-optimizer": "sgd", "server-lr": 1.0, "server-momentum": 0.0, "flag-threshold": 0.5}


def run(out: Path, alphas: list[float], policies: list[str], seeds: str, jobs: int, aggregators: str) -> None:
    """Run the sweeps (each resumable) into ``out/alpha<a>-<policy>``."""
    for policy in policies:
        for alpha in alphas:
            overrides = BASE | {"alpha": alpha, "policy": policy}
            command = [sys.executable, "-m", "simulations", "sweep", "--attacks", ",".join(ATTACKS),
                       "--aggregators", aggregators, "--seeds", seeds, "--jobs", str(jobs),
                       "--out", str(out / f"alpha{alpha}-{policy}")]
            for key, value in overrides.items():
                if key != "aggregator":
                    command += [f"--{key}", str(value)]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=False)


def load_cells(directories: list[Path]) -> list[dict[str, Any]]:
    """Every finished cell below the given sweep directories."""
    cells = []
    for directory in directories:
        for path in sorted(Path(directory).glob("**/cells/*/summary.json")):
            summary = json.loads(path.read_text())
            config = summary["config"]
            cells.append({"path": path.parent, "attack": config["attack"], "alpha": float(config["alpha"]),
                          "seed": int(config["seed"]), "policy": config["policy"],
                          "aggregator": "+".join(filter(None, [config.get("pre-aggregation", "").replace(",", "+"),
                                                               config["aggregator"]])),
                          "malicious": {int(m) for m in summary.get("malicious_nodes") or []},
                          "rounds": summary["rounds"], "final_accuracy": summary["final_accuracy"]})
    return cells


def rescore(rounds: list[dict], threshold: float = 0.5, **scoring: float) -> list[dict]:
    """The rounds with ``scores``, ``flagged`` and ``features`` from the current scoring code.

    ``scoring`` goes to :func:`server.scoring.score_features` (``z_onset``, ``z_half``).
    """
    reputation = Reputation("flag", threshold=threshold)
    out = []
    for record in rounds:
        features = record.get("features") or {}
        nodes = sorted(int(n) for n in features)
        if not nodes:
            out.append(record | {"scores": {}, "flagged": []})
            continue
        column = {k: torch.tensor([features[str(n)][k] for n in nodes], dtype=torch.float64)
                  for k in ("norm", "cosine", "distance", "rule_z")}
        scores = score_features(column["norm"], column["cosine"], column["distance"], column["rule_z"], **scoring)
        flagged = reputation.observe(int(record["round"]), nodes, scores.combined)
        rows = {str(row.pop("node_id")): row for row in scores.as_rows(nodes)}
        out.append(record | {"scores": {str(n): float(c) for n, c in zip(nodes, scores.combined.tolist())},
                             "flagged": flagged, "features": rows})
    return out


def evidence_kind(features: dict) -> str:
    """Which kind of evidence dominated a flagged pair: size, direction, smallness or the rule's score."""
    kinds = {"norm": features.get("norm_z", 0.0), "distance": features.get("distance_z", 0.0),
             "rule": features.get("rule_z", 0.0), "cosine": features.get("cosine_z", 0.0),
             "small norm": -features.get("log_norm_z", 0.0) if "log_norm_z" in features else -abs(features.get("norm_z", 0.0))}
    return max(kinds, key=lambda k: kinds[k])


def cell_stats(cell: dict[str, Any], rounds: list[dict]) -> dict[str, Any]:
    """Honest flags and quarantines, attackers' detection, of one cell."""
    malicious = cell["malicious"]
    all_nodes = {int(n) for r in rounds for n in list(r.get("features") or {}) + list(r.get("accepted") or [])}
    honest_nodes = all_nodes - malicious
    honest_pairs = honest_flagged = attacker_pairs = attacker_flagged = 0
    flagged_nodes: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    kept_out: set[int] = set()
    scores, labels = [], []
    replay = Reputation("quarantine")
    for record in rounds:
        flagged = {int(n) for n in record.get("flagged") or []}
        scored = {int(n): float(s) for n, s in (record.get("scores") or {}).items()}
        nodes = sorted(scored)
        if nodes:
            replay.observe(int(record["round"]), nodes, [scored[n] for n in nodes])
        for node, score in scored.items():
            scores.append(score)
            labels.append(node in malicious)
            if node in malicious:
                attacker_pairs += 1
                attacker_flagged += node in flagged
            else:
                honest_pairs += 1
                if node in flagged:
                    honest_flagged += 1
                    flagged_nodes[node] += 1
                    kinds[evidence_kind(record["features"][str(node)])] += 1
        present = scored.keys() | {int(n) for n in record.get("accepted") or []}
        excluded = {int(n) for n in record.get("excluded") or []}
        kept_out |= (honest_nodes - present) | (excluded - malicious)
    labels_array = np.asarray(labels, dtype=bool)
    detection = (auroc(np.asarray(scores), labels_array)
                 if labels_array.any() and not labels_array.all() else None)
    replayed = {n for n in replay.quarantines if n not in malicious}
    return {"attack": cell["attack"], "alpha": cell["alpha"], "seed": cell["seed"], "policy": cell["policy"],
            "aggregator": cell["aggregator"], "final_accuracy": cell["final_accuracy"],
            "honest_nodes": len(honest_nodes), "honest_pairs": honest_pairs, "honest_flagged_pairs": honest_flagged,
            "honest_nodes_flagged": len(flagged_nodes), "flags_per_flagged_node": sorted(flagged_nodes.values()),
            "honest_nodes_kept_out": len(kept_out) if cell["policy"] == "quarantine" else None,
            "honest_nodes_quarantined_replay": len(replayed), "evidence": dict(kinds),
            "auroc": detection, "recall": attacker_flagged / attacker_pairs if attacker_pairs else None}


def summarise(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pool the seeds of each (policy, aggregator, alpha, attack)."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for s in stats:
        groups[(s["policy"], s["aggregator"], s["alpha"], s["attack"])].append(s)
    rows = []
    for (policy, aggregator, alpha, attack), items in sorted(groups.items()):
        pairs = sum(s["honest_pairs"] for s in items)
        flagged = sum(s["honest_flagged_pairs"] for s in items)
        evidence: collections.Counter = collections.Counter()
        for s in items:
            evidence.update(s["evidence"])
        kept = [s["honest_nodes_kept_out"] for s in items if s["honest_nodes_kept_out"] is not None]
        aurocs = [s["auroc"] for s in items if s["auroc"] is not None]
        recalls = [s["recall"] for s in items if s["recall"] is not None]
        rows.append({"policy": policy, "aggregator": aggregator, "alpha": alpha, "attack": attack,
                     "seeds": len(items), "honest_flag_rate": flagged / pairs if pairs else None,
                     "honest_nodes_flagged": sum(s["honest_nodes_flagged"] for s in items),
                     "honest_nodes": sum(s["honest_nodes"] for s in items),
                     "honest_nodes_quarantined_replay": sum(s["honest_nodes_quarantined_replay"] for s in items),
                     "honest_nodes_kept_out": sum(kept) if kept else None,
                     "evidence": dict(evidence), "auroc": min(aurocs) if aurocs else None,
                     "recall": float(np.mean(recalls)) if recalls else None,
                     "final_accuracy": float(np.mean([s["final_accuracy"] for s in items]))})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table row per (policy, aggregator, alpha, attack)."""
    lines = ["| policy | rule | alpha | attack | honest pairs flagged | honest nodes flagged | "
             "quarantined (replay / actual) | flagged on | attackers: min AUROC / recall | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = "-" if r["honest_nodes_kept_out"] is None else str(r["honest_nodes_kept_out"])
        detection = "-" if r["auroc"] is None else f"{r['auroc']:.3f} / {r['recall']:.2f}"
        evidence = ", ".join(f"{k} {v}" for k, v in sorted(r["evidence"].items(), key=lambda kv: -kv[1])) or "-"
        lines.append(f"| {r['policy']} | {r['aggregator']} | {r['alpha']:g} | {r['attack']} | "
                     f"{100 * r['honest_flag_rate']:.2f}% | {r['honest_nodes_flagged']}/{r['honest_nodes']} | "
                     f"{r['honest_nodes_quarantined_replay']} / {kept} | {evidence} | {detection} | "
                     f"{r['final_accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--out", type=Path, required=True)
    run_parser.add_argument("--alphas", default="0.1,0.3,0.5")
    run_parser.add_argument("--policies", default="flag,quarantine")
    run_parser.add_argument("--seeds", default="0,1,2")
    run_parser.add_argument("--aggregators", default="trimmed-mean")
    run_parser.add_argument("--jobs", type=int, default=2)
    report_parser = commands.add_parser("report")
    report_parser.add_argument("dirs", type=Path, nargs="+")
    report_parser.add_argument("--rescore", action="store_true",
                               help="score the stored features again with the current server.scoring")
    report_parser.add_argument("--json", type=Path, default=None, help="also write the pooled rows here")
    report_parser.add_argument("--z-onset", type=float, default=None, help="with --rescore: score_features' z_onset")
    report_parser.add_argument("--z-half", type=float, default=None, help="with --rescore: score_features' z_half")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.out, [float(a) for a in args.alphas.split(",")], args.policies.split(","), args.seeds, args.jobs,
            args.aggregators)
        return 0
    cells = load_cells(args.dirs)
    scoring = {k: v for k, v in (("z_onset", args.z_onset), ("z_half", args.z_half)) if v is not None}
    stats = [cell_stats(c, rescore(c["rounds"], **scoring) if args.rescore else c["rounds"]) for c in cells]
    rows = summarise(stats)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cells": stats}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
