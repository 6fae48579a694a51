"""What an experiment costs: a sweep cell against a plain loop, ``simulations run``, a whole grid.

Measured (each part can be run alone with ``--parts``):

* ``cell``: one sweep cell (25 IID digits clients, 20 rounds, the mean, no attack) run the way a
  sweep worker runs it (``simulations.sweep.run_cell`` in a warm process), on the in-process
  engine with and without Flower's wire form, and once on Flower's Ray engine; against
  ``reference_loop``, a plain in-process loop of the same experiment written with ``client/``'s
  functions directly (same data, MLP, local SGD and seeds; FedAvg; central evaluation), kept here
  for comparison only. Repetitions alternate loop and cell, the median is reported.
* ``run``: ``python -m simulations run --attack sign-flip --num-malicious 2`` (what ``make run``
  runs), end to end in a fresh interpreter, on both engines.
* ``grid``: the docs/results.md grid (14 attacks x 9 rules x 3 seeds, 20 clients, 20 rounds)
  through ``python -m simulations sweep --jobs N``, in full, or ``--grid-seeds 0`` for a third of
  it (the report then says it extrapolated).

The report replaces the section between the ``sweep-speed`` markers in ``--out`` (default
docs/benchmarks.md) and says which machine, load and commands produced it.

Usage::

    python benchmarks/sweep_speed.py                                  # every part, full grid
    python benchmarks/sweep_speed.py --parts cell,run                 # minutes
    python benchmarks/sweep_speed.py --parts grid --jobs 2 --grid-seeds 0
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

BEGIN, END = "<!-- sweep-speed:begin -->", "<!-- sweep-speed:end -->"

#: The docs/results.md grid.
GRID_ATTACKS = ("none,label-flip,targeted-label-flip,backdoor,sign-flip,scaling,gaussian,alie,alie-adaptive,ipm,"
                "ipm-adaptive,min-max,min-sum,mimic")
GRID_AGGREGATORS = "mean,median,trimmed-mean,krum,multi-krum,bulyan,geometric-median,centered-clipping,nnm+trimmed-mean"
GRID_SETTINGS = ["--num-clients", "20", "--num-malicious", "4", "--num-byzantine", "4", "--alpha", "0.5",
                 "--rounds", "20", "--attack-params", "sign-flip:scale=10"]

#: The experiment of the cell-versus-loop comparison.
CELL = {"num-clients": 25, "rounds": 20, "attack": "none", "num-malicious": 0, "aggregator": "mean",
        "num-byzantine": 0, "seed": 0, "pre-aggregation": "", "server-momentum": 0.0}


def reference_loop(num_clients: int = 25, rounds: int = 20, seed: int = 0) -> list[float]:
    """The plain in-process loop: FedAvg of ``client/``'s local training, for comparison only.

    Same data, model and local training as the ``digits-mlp`` task (``client.training.default_train``:
    2 epochs of SGD, lr 0.3, batch 16, the ClientApp's per-round seeds) and central evaluation
    as a Phalanx cell; no Flower, no messages, no validation, scoring, audit or files.

    Returns
    -------
    list of float
        Test accuracy after each round.
    """
    import numpy as np
    import torch

    from client.task import load_task
    from client.training import default_evaluate, default_train

    task = load_task("digits-mlp")
    config = {"dataset": "auto", "alpha": 0.0, "seed": seed, "local-epochs": 2, "lr": 0.3, "batch-size": 16}
    test = task.load_test(config)
    torch.manual_seed(seed)
    global_model = task.build_model(config)
    partitions = [task.load_partition(i, num_clients, config) for i in range(num_clients)]
    accuracies = []
    for server_round in range(1, rounds + 1):
        total = None
        weight = 0
        for partition_id, data in enumerate(partitions):
            local = task.build_model(config)
            local.load_state_dict(global_model.state_dict())
            rng = np.random.default_rng([seed, partition_id, server_round])
            torch.default_generator.manual_seed(int(rng.integers(2**62)))
            default_train(local, data, config, torch.device("cpu"))
            vector = torch.nn.utils.parameters_to_vector(local.parameters()).detach() * len(data.y)
            total = vector if total is None else total + vector
            weight += len(data.y)
        torch.nn.utils.vector_to_parameters(total / weight, global_model.parameters())
        accuracies.append(default_evaluate(global_model, test, torch.device("cpu"))["accuracy"])
    return accuracies


#: Where a profiled cell's own time (cProfile tottime) is attributed: the first pattern that matches.
AREAS = (("torch (training and tensors)", ("/torch/",)), ("client/ (the ClientApp)", (f"{REPO_ROOT}/client/",)),
         ("server/ (ServerApp, strategy, audit, checkpoint, report)", (f"{REPO_ROOT}/server/",)),
         ("aggregators/", (f"{REPO_ROOT}/aggregators/",)),
         ("simulations/ (engine, harness)", (f"{REPO_ROOT}/simulations/",)),
         ("flwr (records, wire form)", ("/flwr/",)), ("numpy", ("/numpy/",)),
         ("json", ("/json/",)), ("matplotlib (report figures)", ("/matplotlib/", "/PIL/")))


#: Builtins (C functions, cProfile's file "~") by their name.
BUILTIN_AREAS = (("torch (training and tensors)", ("torch",)), ("numpy", ("numpy",)),
                 ("file writes (fsync, rename, write)", ("posix.", "_io.", "'write' of")),
                 ("hashing (SHA-256: wire ids, audit chain)", ("_hashlib", "sha256", "openssl")),
                 ("pickling (torch.save of checkpoint, model)", ("_pickle",)),
                 ("json", ("_json",)), ("flwr (records, wire form)", ("google._upb", "protobuf", "upb")))


def profile_cell(run) -> dict[str, float]:
    """Seconds of cProfile's own time per area of the code for one call of ``run``."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(run)
    shares: dict[str, float] = {}
    for (filename, _, function), (_, _, tottime, _, _) in pstats.Stats(profiler).stats.items():  # type: ignore
        area = next((name for name, needles in AREAS if any(n in filename for n in needles)), None)
        if area is None and filename == "~":  # a builtin: named by what it belongs to
            area = next((name for name, needles in BUILTIN_AREAS if any(n in function for n in needles)), None)
        area = area or "other (Python's stdlib and builtins)"
        shares[area] = shares.get(area, 0.0) + tottime
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


def _timed(function, *args, **kwargs) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - started, value


def measure_cell(repeats: int, scratch: Path, with_ray: bool) -> dict[str, Any]:
    """Loop and cell, alternated, in this (warm) process; a Ray cell once."""
    from simulations.harness import run_federation, simulate
    from simulations.sweep import Cell, cell_overrides, run_cell, warm_up_worker

    warm_up_worker()
    reference_loop(rounds=2)  # first-time costs (data, allocator) out of the way, for both
    cell = Cell("none", "mean", 0)
    base = {k: v for k, v in CELL.items() if k not in ("attack", "aggregator", "seed")}
    overrides = cell_overrides(base, cell, {"none": ""}, scratch / "warm")
    run_cell(overrides | {"rounds": 2}, cell, scratch / "warm")
    loop_s, cell_s, unwired_s, breakdown, accuracy = [], [], [], [], {}
    for index in range(repeats):
        seconds, accuracy["loop"] = _timed(reference_loop)
        loop_s.append(seconds)
        sweep_dir = scratch / f"cell-{index}"
        seconds, result = _timed(run_cell, cell_overrides(base, cell, {"none": ""}, sweep_dir), cell, sweep_dir)
        assert result.status == "ok", result.error
        cell_s.append(seconds)
        summary = json.loads((cell.directory(sweep_dir) / "summary.json").read_text())
        accuracy["cell"] = [r["accuracy"] for r in summary["rounds"]]
        breakdown.append({"client_seconds": summary["engine"]["client_seconds"],
                          "wire_seconds": summary["engine"]["wire"]["seconds"],
                          "wire_messages": summary["engine"]["wire"]["messages"],
                          "wire_bytes": summary["engine"]["wire"]["bytes"],
                          "rounds_seconds": sum(r["seconds"] for r in summary["rounds"])})
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its round table
            seconds, _ = _timed(simulate, overrides | {"out": str(scratch / f"unwired-{index}")}, wire=False)
        unwired_s.append(seconds)
    profile_dir = scratch / "profiled"
    out = {"loop_seconds": loop_s, "cell_seconds": cell_s, "cell_without_wire_seconds": unwired_s,
           "breakdown": breakdown, "final_accuracy": {k: v[-1] for k, v in accuracy.items()},
           "profile": profile_cell(lambda: run_cell(cell_overrides(base, cell, {"none": ""}, profile_dir), cell,
                                                    profile_dir))}
    if with_ray:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            seconds, summary = _timed(run_federation, overrides | {"out": str(scratch / "ray")}, engine="ray")
        out["ray_cell_seconds"] = seconds
        out["ray_first_round_seconds"] = summary["rounds"][0]["seconds"]
    return out


def measure_run(repeats: int, scratch: Path) -> dict[str, Any]:
    """``python -m simulations run`` as ``make run`` calls it, in a fresh interpreter each time."""
    command = [sys.executable, "-m", "simulations", "run", "--attack", "sign-flip", "--num-malicious", "2"]
    times: dict[str, list[float]] = {"inprocess": [], "ray": []}
    for engine, count in (("inprocess", repeats), ("ray", 1)):
        for index in range(count):
            full = command + ["--engine", engine, "--out", str(scratch / f"run-{engine}-{index}")]
            seconds, done = _timed(subprocess.run, full, cwd=REPO_ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{shlex.join(full)} failed:\n{done.stderr[-2000:]}")
            times[engine].append(seconds)
    return {"command": shlex.join(["python", *command[1:]]), "seconds": times}


def measure_cluster(scratch: Path) -> dict[str, Any]:
    """``simulations run``'s federation on a one-node Ray cluster started beforehand, and in-process.

    The cluster is what ``ray start --head`` gives a multi-machine setup (docs/scaling.md); the
    run joins it (``--ray-address``) instead of starting Ray, so only the actors start per run.
    """
    from simulations.harness import local_ray_cluster, run_federation

    config = {"attack": "sign-flip", "num-malicious": 2}
    with local_ray_cluster() as cluster:
        started = time.perf_counter()
        joined = run_federation(config | {"out": str(scratch / "on-cluster")}, engine="ray",
                                ray_address=cluster.address)
        on_cluster = time.perf_counter() - started
        workers = len(list(cluster.session_dir.glob("logs/worker-*.out")))
    started = time.perf_counter()
    inprocess = run_federation(config | {"out": str(scratch / "beside-cluster")})
    return {"cluster_seconds": on_cluster, "inprocess_seconds": time.perf_counter() - started,
            "first_round_seconds": joined["rounds"][0]["seconds"], "cluster_workers": workers,
            "same_accuracies": [r["accuracy"] for r in joined["rounds"]]
            == [r["accuracy"] for r in inprocess["rounds"]]}


def measure_grid(jobs: int, seeds: str, out: Path) -> dict[str, Any]:
    """The docs/results.md grid through the sweep command; wall time and per-cell numbers."""
    command = [sys.executable, "-m", "simulations", "sweep", "--attacks", GRID_ATTACKS, "--aggregators",
               GRID_AGGREGATORS, "--seeds", seeds, *GRID_SETTINGS, "--jobs", str(jobs), "--out", str(out)]
    seconds, done = _timed(subprocess.run, command, cwd=REPO_ROOT, capture_output=True, text=True)
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    ok = [r for r in rows if r["status"] == "ok"]
    cell_seconds = [float(r["wall_seconds"]) for r in ok]
    full_cells = 14 * 9 * 3
    return {"command": shlex.join(["python", *command[1:]]), "returncode": done.returncode,
            "wall_seconds": seconds, "cells": len(rows), "ok": len(ok), "jobs": jobs,
            "cell_seconds_median": statistics.median(cell_seconds) if cell_seconds else None,
            "cell_seconds_max": max(cell_seconds) if cell_seconds else None,
            "projected_full_seconds": seconds * full_cells / len(rows) if rows else None,
            "full": len(rows) == full_cells}


def machine() -> dict[str, Any]:
    import torch

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib import metadata

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "flwr": metadata.version("flwr"), "platform": platform.platform()}


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def render(results: dict[str, Any]) -> str:
    """The docs section for the measured parts; each part says its command and the load it ran under."""
    contexts = [results[p]["context"] for p in ("cell", "run", "cluster", "grid") if p in results]
    m = contexts[0]["machine"] if contexts else machine()
    lines = [BEGIN, "## Experiment speed: runs and sweep cells (issue 15)", "",
             "Generated by `benchmarks/sweep_speed.py` (raw numbers in `benchmarks/results/sweep_speed.json`); "
             "rerun it to refresh this section, or a part of it with `--parts`.", "",
             f"- Machine: {m['cpu']}, {m['cores']} logical cores; Python {m['python']}, torch {m['torch']}, "
             f"flwr {m['flwr']}. Other work shared the cores (the load average is given per part): these are "
             "upper bounds.", ""]

    def measured(part: str) -> str:
        context = results[part]["context"]
        return (f"Measured by {context['command']}; load average {context['load_start']} at the start, "
                f"{context['load_end']} at the end.")

    if "cell" in results:
        c = results["cell"]
        loop, cell, unwired = (statistics.median(c[k]) for k in ("loop_seconds", "cell_seconds",
                                                                  "cell_without_wire_seconds"))
        b = c["breakdown"][len(c["breakdown"]) // 2]
        lines += ["### A sweep cell against a plain in-process loop", "",
                  "25 IID digits clients, 20 rounds, mean, no attack; median of "
                  f"{len(c['loop_seconds'])} alternating repetitions in one warm process.", "",
                  "| what | seconds | vs loop |", "|---|---:|---:|",
                  f"| plain loop (`reference_loop`: client/ functions, FedAvg, no Flower) | {loop:.2f} | 1.00x |",
                  f"| sweep cell, in-process engine (`run_cell`, as a worker runs it) | {cell:.2f} | "
                  f"{cell / loop:.2f}x |",
                  f"| the same cell without the wire form (`wire=False`) | {unwired:.2f} | {unwired / loop:.2f}x |"]
        if "ray_cell_seconds" in c:
            lines.append(f"| the same cell on Flower's Ray engine (`--engine ray`) | {c['ray_cell_seconds']:.2f} | "
                         f"{c['ray_cell_seconds'] / loop:.2f}x |")
        lines += ["", f"In the cell: {b['client_seconds']:.2f} s inside the ClientApp, {b['wire_seconds']:.2f} s "
                  f"deflating, hashing and inflating {b['wire_messages']} messages "
                  f"({b['wire_bytes'] / 1e6:.1f} MB), {b['rounds_seconds']:.2f} s in the rounds in all (the rest "
                  "of a cell: the server's set-up, report.html, model.pt). Final accuracy: loop "
                  f"{c['final_accuracy']['loop']:.4f}, cell {c['final_accuracy']['cell']:.4f}.", measured("cell"), ""]
        if "profile" in c:
            total = sum(c["profile"].values())
            lines += ["Where a cell's time goes (one more cell under cProfile, which slows Python-heavy code more "
                      f"than torch's kernels; {total:.1f} s profiled):", "", "| area | share |", "|---|---:|"]
            lines += [f"| {area} | {seconds / total:.0%} |" for area, seconds in c["profile"].items()]
            lines.append("")
        engine_s = cell - unwired
        lines += [f"Against this lean loop a cell costs {cell / loop:.1f}x; the issue asked for at most 2x. The "
                  f"engine's own part is small: the wire form is {engine_s:.2f} s of the {cell:.2f} s (without it "
                  f"the cell is {unwired / loop:.1f}x), the Grid's own code (`simulations/`) a few percent. Sweep "
                  "cells already skip what only a single run needs (per-round checkpoints, report.html; "
                  "summary.json is written once at the end), the ClientApp reuses the built-in model and the "
                  "default training applies SGD without torch.optim's per-step bookkeeping (which made the "
                  "loop faster too). What is left is what a Phalanx round does that this loop does not: Flower's "
                  "records (every Array is an .npy buffer, decoded and encoded on each side of every message), "
                  "the validation, scoring and audit of every reply, and the wire form.", ""]
    if "run" in results:
        r = results["run"]
        inprocess = statistics.median(r["seconds"]["inprocess"])
        lines += ["### `simulations run` with the defaults (what `make run` runs)", "",
                  f"`{r['command']}`, wall time in a fresh interpreter (imports included):", "",
                  "| engine | seconds |", "|---|---:|",
                  f"| in-process (default), median of {len(r['seconds']['inprocess'])} | {inprocess:.1f} |",
                  f"| Ray (`--engine ray`) | {statistics.median(r['seconds']['ray']):.1f} |", "", measured("run"), ""]
    if "cluster" in results:
        c = results["cluster"]
        lines += ["### A run on a Ray cluster started beforehand", "",
                  "`simulations run --attack sign-flip --num-malicious 2 --engine ray --ray-address ADDRESS` on a "
                  "one-node cluster from `ray start --head` (`simulations.harness.local_ray_cluster`): "
                  f"{c['cluster_seconds']:.1f} s, of which the first round (the actors starting) "
                  f"{c['first_round_seconds']:.1f} s; {c['cluster_workers']} Ray worker processes ran in the "
                  f"cluster's session. The same run in-process: {c['inprocess_seconds']:.1f} s; per-round "
                  f"accuracies {'identical' if c['same_accuracies'] else 'DIFFERENT'}.", measured("cluster"), ""]
    if "grid" in results:
        g = results["grid"]
        lines += ["### The docs/results.md grid", "", "```", g["command"], "```", "",
                  f"{g['ok']} of {g['cells']} cells ok in {g['wall_seconds'] / 60:.1f} min wall with "
                  f"{g['jobs']} workers; a cell took {g['cell_seconds_median']:.1f} s (median, "
                  f"max {g['cell_seconds_max']:.1f} s) inside its worker."]
        if not g["full"]:
            lines.append(f"This was {g['cells']} of the 378 cells; the full grid extrapolates to "
                         f"{g['projected_full_seconds'] / 60:.1f} min (same cells per seed, so the same mix).")
        lines += [measured("grid"), ""]
    lines.append(END)
    return "\n".join(lines)


def _merge(stored: dict[str, Any], new: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """The parts measured now replace their stored numbers; each part keeps its own context."""
    merged = {k: v for k, v in stored.items() if k in ("cell", "run", "cluster", "grid")}
    for part in parts:
        merged[part] = new[part] | {"context": {k: new[k] for k in ("command", "load_start", "load_end", "machine")}}
    return merged


def write_section(path: Path, section: str) -> None:
    """Replace the marked section of ``path`` (or append it)."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="cell,run,cluster,grid", help="comma list of cell, run, cluster, grid")
    parser.add_argument("--render-only", action="store_true", help="measure nothing: rewrite the section from --json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="grid: sweep workers")
    parser.add_argument("--grid-seeds", default="0,1,2", help="grid: seeds (0,1,2 is the full grid)")
    parser.add_argument("--no-ray", action="store_true", help="cell: skip the Ray engine cell")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--json", default=str(REPO_ROOT / "benchmarks" / "results" / "sweep_speed.json"),
                        help="raw numbers: parts measured now replace theirs, the others are kept and reported")
    parser.add_argument("--scratch", default=None, help="where runs go (default: a temporary directory)")
    args = parser.parse_args(argv)
    os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
    parts = [] if args.render_only else [p.strip() for p in args.parts.split(",") if p.strip()]
    json_path = Path(args.json)
    stored = json.loads(json_path.read_text()) if json_path.exists() else {}
    if args.render_only:
        write_section(Path(args.out), render(stored))
        print(f"wrote {args.out} from {json_path}")
        return 0
    results: dict[str, Any] = {"command": "`python benchmarks/sweep_speed.py " + shlex.join(argv or sys.argv[1:]) + "`",
                               "load_start": _load(), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="sweep-speed-") as tmp:
        scratch = Path(args.scratch or tmp)
        if "run" in parts:
            results["run"] = measure_run(args.repeats, scratch)
            print(json.dumps(results["run"]), flush=True)
        if "cell" in parts:
            results["cell"] = measure_cell(args.repeats, scratch, with_ray=not args.no_ray)
            print(json.dumps({k: v for k, v in results["cell"].items() if k != "breakdown"}), flush=True)
        if "cluster" in parts:
            results["cluster"] = measure_cluster(scratch)
            print(json.dumps(results["cluster"]), flush=True)
        if "grid" in parts:
            results["grid"] = measure_grid(args.jobs, args.grid_seeds, scratch / "grid")
            print(json.dumps(results["grid"]), flush=True)
    results["load_end"] = _load()
    merged = _merge(stored, results, parts)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(merged, indent=2))
    write_section(Path(args.out), render(merged))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
