"""Accuracy against epsilon, and a backdoor against norm clipping with weak noise, on digits.

Usage::

    python benchmarks/privacy_tradeoff.py --out runs/privacy-tradeoff
    python benchmarks/privacy_tradeoff.py --rounds 5 --central-sigmas 0,1 --client-sigmas 1 --out /tmp/quick

Every cell is one real federation on Flower's simulation engine (``simulations.harness.run_federation``):
digits, ``--num-clients`` IID clients, ``--rounds`` rounds, every client every round (so the
accountant's sampling rate is ``q = 1``), clip norm ``--clip-norm`` and ``delta = --delta``.

Two studies:

``utility``
    No attacker. For each rule in ``--aggregators``: one ``dp=off`` run, one run that only clips
    (``clip``, below), one ``dp=central`` run per noise multiplier in ``--central-sigmas`` and one
    ``dp=client`` run per noise multiplier in ``--client-sigmas``. It reports the final and best test
    accuracy and the epsilon the run reported.
``backdoor``
    ``--num-attackers`` clients run a pixel-trigger backdoor with model replacement
    (``attack=backdoor``, ``attack-params=boost=...``). Each rule runs with ``dp=off`` and with central
    clipping plus ``--backdoor-sigma`` noise; the mean also with clipping alone: Sun et al. 2019, *Can
    you really backdoor federated learning?*, found that norm clipping with weak noise blunts such
    attacks. It reports the attack-success rate (triggered test inputs classified as the target) too.

Clipping alone is ``dp=off`` with the ``clip:norm=C`` pre-aggregation step (row ``dp = clip``): every
update is scaled to norm at most ``C`` before the rule. ``dp=central`` with ``noise-multiplier 0``
would be the same, but at the time of writing such a run fails at the end of round 1 (its epsilon is
infinite and the audit log refuses a non-finite number; ``tests/test_privacy_e2e.py`` pins it).

A cell that already has a complete ``summary.json`` written with the same settings is not run again,
so an interrupted benchmark resumes. A cell whose run raises is recorded (``error.txt``) and reported
as failed; the others go on.

Writes to ``--out``: one directory per cell (the run directory), ``results.csv``, ``results.json``
and ``results.md`` (tables, the machine, the command line). The update norms per round of the
``dp=off`` runs are reported too: they are what a clip norm should be chosen against.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: The rules compared, with the number of Byzantine clients f each assumes.
DEFAULT_AGGREGATORS = ("mean", "trimmed-mean")
#: f for each rule when the grid has no attacker (the mean has no f) and when it has one.
NUM_BYZANTINE = {"mean": 0}
DEFAULT_F = 2


@dataclass(frozen=True)
class Cell:
    """One federation of the benchmark.

    Attributes
    ----------
    study : str
        ``utility`` (no attacker) or ``backdoor``.
    aggregator : str
        A registered rule name.
    dp : str
        ``off``, ``central``, ``client``, or ``clip``: no DP, the ``clip:norm=C`` pre-aggregation step.
    noise_multiplier : float
        sigma (ignored when ``dp`` is ``off`` or ``clip``).
    """

    study: str
    aggregator: str
    dp: str
    noise_multiplier: float

    @property
    def name(self) -> str:
        """The cell's directory name, e.g. ``utility-mean-central-0.5``."""
        sigma = "" if self.dp in ("off", "clip") else f"-{self.noise_multiplier:g}"
        return f"{self.study}-{self.aggregator}-{self.dp}{sigma}"

    def overrides(self, args: argparse.Namespace, root: Path) -> dict[str, Any]:
        """The run-config keys this cell sets (the rest are the project's defaults)."""
        config: dict[str, Any] = {
            "dataset": "digits",
            "num-clients": args.num_clients,
            "alpha": 0.0,
            "rounds": args.rounds,
            "fraction-train": 1.0,
            "seed": args.seed,
            "aggregator": self.aggregator,
            "num-byzantine": NUM_BYZANTINE.get(self.aggregator, DEFAULT_F),
            "pre-aggregation": "",  # the rule alone (the defaults put FLAME in front)
            "server-momentum": 0.0,
            "dp": "off" if self.dp == "clip" else self.dp,
            "clip-norm": args.clip_norm,
            "noise-multiplier": self.noise_multiplier if self.dp in ("central", "client") else 0.0,
            "delta": args.delta,
            "out": str(root / self.name),
        }
        if self.dp == "clip":
            config["pre-aggregation"] = f"clip:norm={args.clip_norm:g}"
        if self.study == "backdoor":
            config |= {"attack": "backdoor", "num-malicious": args.num_attackers,
                       "attack-params": f"boost={args.boost:g}"}
        else:
            config |= {"attack": "none", "num-malicious": 0}
        return config


def build_grid(args: argparse.Namespace) -> list[Cell]:
    """The cells the arguments ask for, utility study first."""
    rules = _split(args.aggregators)
    cells: list[Cell] = []
    for rule in rules:
        cells.append(Cell("utility", rule, "off", 0.0))
        cells.append(Cell("utility", rule, "clip", 0.0))
        cells += [Cell("utility", rule, "central", s) for s in _floats(args.central_sigmas)]
        cells += [Cell("utility", rule, "client", s) for s in _floats(args.client_sigmas)]
    for rule in rules:
        cells.append(Cell("backdoor", rule, "off", 0.0))
        if rule == "mean":
            # Clipping alone, to separate what the norm bound does from what the noise does.
            cells.append(Cell("backdoor", rule, "clip", 0.0))
        cells.append(Cell("backdoor", rule, "central", args.backdoor_sigma))
    return cells


def result_row(cell: Cell, overrides: dict[str, Any], summary: dict | None, error: str | None) -> dict[str, Any]:
    """One row of results.csv: what the cell asked for and what its run reported."""
    clip_norm = overrides["clip-norm"] if cell.dp != "off" else None
    row: dict[str, Any] = asdict(cell) | {"name": cell.name, "clip_norm": clip_norm,
                                          "status": "failed" if error else "ok", "error": error}
    if summary is None:
        return row
    rounds = summary.get("rounds") or []
    privacy = summary.get("privacy") or {}
    noise = _noise_stds(Path(overrides["out"]))
    row |= {
        "rounds_done": len(rounds),
        "final_accuracy": summary.get("final_accuracy"),
        "best_accuracy": summary.get("best_accuracy"),
        "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
        "backdoor_asr": summary.get("backdoor_asr"),
        "max_backdoor_asr": max((r["backdoor_asr"] for r in rounds if r.get("backdoor_asr") is not None), default=None),
        "noise_std": statistics.fmean(noise) if noise else None,
        "median_update_norms": [statistics.median(f["norm"] for f in r["features"].values())
                                for r in rounds if r.get("features")],
        "wall_seconds": summary.get("wall_seconds"),
        "stopped_early": summary.get("stopped_early"),
    }
    return row


def _noise_stds(run_dir: Path) -> list[float]:
    """Server noise std of every round (central DP), read from the run's checkpoint.

    summary.json does not carry ``noise_std``; the checkpoint keeps each round's full record.
    """
    from server.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / "checkpoint.pt")
    if state is None:
        return []
    return [float(r["noise_std"]) for r in state["rounds"] if r.get("noise_std") is not None]


def run_grid(cells: Sequence[Cell], args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Run (or reuse) every cell in order; print one progress line per cell to stderr."""
    from simulations.harness import default_config, run_federation
    from simulations.sweep import is_done, record_failure

    defaults = default_config()
    rows = []
    for index, cell in enumerate(cells, 1):
        overrides = cell.overrides(args, root)
        cell_dir = Path(overrides["out"])
        error_file = cell_dir / "error.txt"
        started = time.perf_counter()
        if is_done(cell_dir, defaults | overrides):
            how = "reused"
        else:
            error_file.unlink(missing_ok=True)
            how = "ran"
            try:
                with _quiet(cell_dir):
                    run_federation(overrides)
            except Exception as exc:  # one failed configuration is a result to report, not a reason to stop
                record_failure(cell_dir, exc)
        summary = _read_json(cell_dir / "summary.json")
        error = error_file.read_text().splitlines()[0] if error_file.exists() else None
        row = result_row(cell, overrides, summary, error)
        rows.append(row)
        print(f"[{index}/{len(cells)}] {cell.name}: {how} in {time.perf_counter() - started:.0f} s, "
              f"accuracy {_fmt(row.get('final_accuracy'))}, epsilon {_fmt(row.get('epsilon'), 2)}, "
              f"asr {_fmt(row.get('backdoor_asr'))}{'  FAILED: ' + error if error else ''}",
              file=sys.stderr, flush=True)
    return rows


@contextlib.contextmanager
def _quiet(cell_dir: Path):
    """The run's round table goes to the cell's stdout.log; Flower's INFO lines are hidden."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        with open(cell_dir / "stdout.log", "w") as log_file, contextlib.redirect_stdout(log_file):
            yield
    finally:
        flwr_logger.setLevel(level)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

CSV_COLUMNS = ("name", "study", "aggregator", "dp", "noise_multiplier", "clip_norm", "status", "rounds_done",
               "final_accuracy", "best_accuracy", "epsilon", "delta", "noise_std", "backdoor_asr",
               "max_backdoor_asr", "wall_seconds", "error")


def write_outputs(rows: list[dict[str, Any]], root: Path, machine: dict[str, Any], command: str,
                  total_seconds: float) -> None:
    """results.csv, results.json and results.md under ``root``."""
    with open(root / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    payload = {"machine": machine, "command": command, "total_seconds": total_seconds, "rows": rows}
    (root / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    (root / "results.md").write_text(markdown(rows, machine, command, total_seconds))


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any], command: str, total_seconds: float) -> str:
    """The tables docs/privacy.md quotes."""
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} logical CPUs, Python {machine['python']}, "
        f"torch {machine['torch']}, flwr {machine['flwr']}, device {machine['device']}. "
        f"This invocation took {total_seconds / 60:.1f} min; the cells' federations took "
        f"{sum(r.get('wall_seconds') or 0 for r in rows) / 60:.1f} min in all (cells reused from an earlier "
        "invocation count with the time they took then).",
        "",
        "### Utility (no attacker)",
        "",
        "| rule | dp | sigma | noise std / round | epsilon | final acc | best acc | status |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in (r for r in rows if r["study"] == "utility"):
        lines.append(f"| {row['aggregator']} | {row['dp']} | {_sigma(row)} | {_fmt(row.get('noise_std'), 4)} | "
                     f"{_eps(row)} | {_fmt(row.get('final_accuracy'))} | {_fmt(row.get('best_accuracy'))} | "
                     f"{_status(row)} |")
    lines += [
        "",
        "### Backdoor",
        "",
        "| rule | dp | sigma | epsilon | final acc | final ASR | max ASR over rounds | status |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in (r for r in rows if r["study"] == "backdoor"):
        lines.append(f"| {row['aggregator']} | {row['dp']} | {_sigma(row)} | {_eps(row)} | "
                     f"{_fmt(row.get('final_accuracy'))} | {_fmt(row.get('backdoor_asr'))} | "
                     f"{_fmt(row.get('max_backdoor_asr'))} | {_status(row)} |")
    lines += ["", "### Median update norm per round, dp=off, no attacker", ""]
    for row in (r for r in rows if r["study"] == "utility" and r["dp"] == "off" and r.get("median_update_norms")):
        lines.append(f"- {row['aggregator']}: " + ", ".join(f"{n:.2f}" for n in row["median_update_norms"]))
    return "\n".join(lines) + "\n"


def _sigma(row: dict[str, Any]) -> str:
    return "-" if row["dp"] in ("off", "clip") else f"{row['noise_multiplier']:g}"


def _eps(row: dict[str, Any]) -> str:
    if row["dp"] in ("off", "clip") or row.get("status") != "ok":
        return "-"
    epsilon = row.get("epsilon")
    # summary.json stores an infinite epsilon (no noise) as Infinity; a missing one as null.
    return "inf" if epsilon is None or math.isinf(epsilon) else f"{epsilon:.4g}"


def _status(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"failed: {row.get('error')}"
    return "ok" if not row.get("stopped_early") else f"stopped: {row['stopped_early']}"


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    values = []
    for part in _split(text):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"not a number in a sigma list: {part!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a noise multiplier must be a finite number >= 0, got {part!r}")
        values.append(value)
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/privacy-tradeoff", help="directory of the cells and results")
    parser.add_argument("--aggregators", default=",".join(DEFAULT_AGGREGATORS))
    parser.add_argument("--central-sigmas", default="0.05,0.2,1", help="noise multipliers for dp=central")
    parser.add_argument("--client-sigmas", default="0.05,0.2", help="noise multipliers for dp=client")
    parser.add_argument("--backdoor-sigma", type=float, default=0.05, help="weak central noise against the backdoor")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--num-attackers", type=int, default=2)
    parser.add_argument("--boost", type=float, default=5.0, help="backdoor model-replacement factor")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clip_norm <= 0 or args.rounds < 1 or args.num_clients < 1:
        parser.error("--clip-norm, --rounds and --num-clients must be positive")
    if not 0 <= args.num_attackers <= args.num_clients:
        parser.error(f"--num-attackers must be in [0, --num-clients={args.num_clients}]")
    for option in ("central_sigmas", "client_sigmas"):
        try:
            _floats(getattr(args, option))
        except ValueError as exc:
            parser.error(f"--{option.replace('_', '-')}: {exc}")
    if not math.isfinite(args.backdoor_sigma) or args.backdoor_sigma < 0:
        parser.error(f"--backdoor-sigma must be a finite number >= 0, got {args.backdoor_sigma}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid and write the results; 1 when any cell failed."""
    from simulations.sweep import machine_info

    args = parse_args(argv)
    root = Path(args.out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/privacy_tradeoff.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    rows = run_grid(build_grid(args), args, root)
    write_outputs(rows, root, machine_info(), command, time.perf_counter() - started)
    print((root / "results.md").read_text())
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
