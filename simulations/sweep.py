"""``python -m simulations sweep``: the grid attacks x aggregators x seeds, one federation per cell.

Each cell is one :func:`simulations.harness.run_federation` (in-process engine by default,
``--engine ray`` for Flower's simulation engine) into ``DIR/cells/<attack>__<aggregator>__<seed>/``.
Cells run in ``--jobs`` long-lived worker processes (:mod:`simulations.pool`; default: one per
core), each cell's output in its ``stdout.log``. A cell that raises, runs past ``--cell-timeout``
(its worker is killed and replaced) or loses its worker is recorded as failed, with what happened
in its ``error.txt``, and the sweep goes on. The sweep writes, in ``DIR``:

* ``sweep.json`` - the grid, the command line and the machine (written before the first cell);
* ``results.csv`` - one row per (attack, aggregator, seed), failed cells included with their error;
* ``heatmap.png`` - mean final accuracy over seeds, attacks x aggregators, plus a worst-case row;
* ``curves.png`` - accuracy per round, one panel per attack, one line per aggregator;
* ``results.md`` - the mean +- std tables, the command line and the machine.

A rerun skips every cell whose ``summary.json`` holds all its rounds for the same settings, so an
interrupted sweep (Ctrl-C, SIGTERM, even SIGKILL: workers exit when their parent is gone)
continues where it stopped; failed cells run again. ``--shard I/K`` runs every K-th cell only, so
K machines sharing ``DIR`` split a grid (docs/scaling.md). :func:`write_outputs` rebuilds the four result files
from the cells alone.

Grid names: attack ``none`` is the clean reference (it runs with ``num-malicious = 0``); an
aggregator ``nnm+trimmed-mean`` runs ``trimmed-mean`` behind the pre-aggregation ``nnm`` (every part
before the last ``+`` is a pre-aggregation step, in order; ``mean`` is the plain mean, whatever
the defaults put in front of the rule). ``--attack-params`` is either one
``key=value,...`` string for every attack, or per attack: ``"sign-flip:scale=10;backdoor:boost=5"``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from simulations.harness import DEFAULT_ENGINE
from simulations.pool import Outcome
from simulations.progress import sweep_progress

#: The attack name that means "no attack": the clean reference row of every table.
NO_ATTACK = "none"
#: Columns of results.csv, in order.
CSV_COLUMNS = ("attack", "aggregator", "seed", "status", "final_accuracy", "best_accuracy", "backdoor_asr",
               "detection_auroc", "detection_precision", "detection_recall", "rounds_done", "wall_seconds",
               "out", "error")
#: Label of the row that holds, per aggregator, its lowest accuracy over the attacks.
WORST_CASE = "worst case"

_SWEEP_FILE = "sweep.json"
_ERROR_FILE = "error.txt"
_LOG_FILE = "stdout.log"


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One (attack, aggregator, seed) of the grid.

    Attributes
    ----------
    attack : str
        Attack name, or ``"none"``.
    aggregator : str
        Aggregator name as given on the command line, e.g. ``"nnm+trimmed-mean"``.
    seed : int
        The run's seed.
    """

    attack: str
    aggregator: str
    seed: int

    @property
    def name(self) -> str:
        """The cell's directory name, ``<attack>__<aggregator>__<seed>``."""
        return f"{_safe_path_part(self.attack)}__{_safe_path_part(self.aggregator)}__{self.seed}"

    def directory(self, sweep_dir: Path) -> Path:
        """Where the cell's run writes (``DIR/cells/<name>``)."""
        return Path(sweep_dir) / "cells" / self.name


def _safe_path_part(name: str) -> str:
    # Import-path rules ("pkg.module:Name") carry characters some file systems refuse.
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", name)


def split_names(text: str, what: str) -> list[str]:
    """Split a comma list of names, refusing empty lists and repeats.

    Parameters
    ----------
    text : str
        ``"a,b,c"``; whitespace around names is ignored.
    what : str
        The option's name, for the error message (``"--attacks"``).

    Raises
    ------
    ValueError
        If the list is empty or names a value twice.
    """
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise ValueError(f"{what} needs at least one name, got {text!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} names {repeated} more than once")
    return names


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a ValueError names any seed that is not an integer."""
    seeds = []
    for part in split_names(text, "--seeds"):
        try:
            seeds.append(int(part))
        except ValueError:
            raise ValueError(f"--seeds: {part!r} is not an integer seed (in {text!r})") from None
    return seeds


def split_aggregator(name: str) -> tuple[str, str]:
    """Split a grid aggregator name into the rule and its pre-aggregation chain.

    Parameters
    ----------
    name : str
        ``"trimmed-mean"`` or ``"nnm+trimmed-mean"`` or ``"clip+nnm+krum"``.

    Returns
    -------
    tuple of str
        ``(rule, pre_aggregation)``, the run-config values of ``aggregator`` and
        ``pre-aggregation``: ``("trimmed-mean", "nnm")``, ``("krum", "clip,nnm")``. The second is
        ``""`` when the name has no ``+``.

    Raises
    ------
    ValueError
        If a part of the name is empty (``"nnm+"``, ``"+mean"``).
    """
    parts = [part.strip() for part in name.split("+")]
    if any(not part for part in parts):
        raise ValueError(f"aggregator {name!r}: every part around '+' must name a step, e.g. 'nnm+trimmed-mean'")
    return parts[-1], ",".join(parts[:-1])


def parse_attack_params(text: str, attacks: Sequence[str]) -> dict[str, str]:
    """Give each attack of the grid its own ``attack-params`` string.

    Parameters
    ----------
    text : str
        Either a plain ``"key=value,..."`` (no ``:``), passed to every attack, or the per-attack
        form ``"sign-flip:scale=10;backdoor:boost=5,target=0"`` (items split on ``;``, each
        ``attack:params``), which passes each attack only its own parameters.
    attacks : sequence of str
        The grid's attacks.

    Returns
    -------
    dict
        Attack name -> its ``attack-params`` string (``""`` for none); ``"none"`` always gets ``""``.

    Raises
    ------
    ValueError
        For a per-attack item naming an attack that is not in the grid, ``none``, or one attack
        twice; or a string that mixes the two forms.
    """
    params = {attack: "" for attack in attacks}
    text = (text or "").strip()
    if not text:
        return params
    items = [item.strip() for item in text.split(";") if item.strip()]
    per_attack = [_is_per_attack_item(item) for item in items]
    if not any(per_attack):
        if len(items) > 1:
            raise ValueError(f"attack-params {text!r}: ';' separates per-attack items like 'sign-flip:scale=10'")
        return {attack: ("" if attack == NO_ATTACK else items[0]) for attack in attacks}
    if not all(per_attack):
        raise ValueError(f"attack-params {text!r} mixes per-attack items ('name:k=v') with plain 'k=v' items; "
                         "write every item as 'name:k=v'")
    seen: set[str] = set()
    for item in items:
        name, _, values = (part.strip() for part in item.partition(":"))
        if name == NO_ATTACK:
            raise ValueError(f"attack-params {text!r}: attack 'none' takes no parameters")
        if name not in params:
            raise ValueError(f"attack-params {text!r} names attack {name!r}, which is not in --attacks {list(attacks)}")
        if name in seen:
            raise ValueError(f"attack-params {text!r} gives attack {name!r} parameters twice")
        seen.add(name)
        params[name] = values
    return params


def _is_per_attack_item(item: str) -> bool:
    # "name:k=v": a ':' before any '=' (a plain value may itself hold a ':' after its '=').
    head, sep, _ = item.partition(":")
    return bool(sep) and "=" not in head


def cell_overrides(base: dict[str, Any], cell: Cell, attack_params: dict[str, str], sweep_dir: Path) -> dict[str, Any]:
    """The run-config overrides of one cell.

    Parameters
    ----------
    base : dict
        The keys the user set for the whole sweep (dash-case).
    cell : Cell
    attack_params : dict
        From :func:`parse_attack_params`.
    sweep_dir : Path
        The sweep's ``DIR``.

    Returns
    -------
    dict
        ``base`` with the cell's ``attack``, ``attack-params``, ``aggregator``, ``seed`` and
        ``out``; ``num-malicious = 0`` for attack ``none``; ``pre-aggregation`` set from the
        aggregator's name when it has a ``+``, else the sweep-wide ``--pre-aggregation`` when one
        was given, else none (not the defaults' pre-aggregation).
    """
    rule, pre = split_aggregator(cell.aggregator)
    # A cell is rerun whole when it did not finish, and the sweep has its own tables and figures:
    # no per-round checkpoint, no per-cell report.html (unless the sweep's options ask for them).
    overrides = {"checkpoints": False, "report": False} | dict(base) | {
        "attack": cell.attack,
        "attack-params": attack_params.get(cell.attack, ""),
        "aggregator": rule,
        "seed": cell.seed,
        "out": str(cell.directory(sweep_dir)),
    }
    # The grid name is the whole chain: "mean" is the plain mean, not the mean behind the defaults'
    # pre-aggregation (FLAME, in the recommended recipe). A sweep-wide --pre-aggregation still
    # applies to names without a "+".
    if pre or "pre-aggregation" not in base:
        overrides["pre-aggregation"] = pre
    if cell.attack == NO_ATTACK:
        overrides["num-malicious"] = 0
    return overrides


def validate_grid(cells: Sequence[Cell], configs: dict[Cell, dict[str, Any]]) -> None:
    """Check every cell's settings before the first cell runs, so a typo costs no training.

    Builds each cell's run settings, attack and aggregator (construction only: no data, no
    training); the first failure raises.

    Raises
    ------
    ValueError
        Naming the cell and what is wrong with it.
    """
    import aggregators
    from server.settings import RunSettings
    from simulations import attacks as attack_registry

    for cell in cells:
        config = configs[cell]
        try:
            settings = RunSettings.from_run_config(config)
            if cell.attack != NO_ATTACK:
                attack_registry.build(cell.attack, **attack_registry.parse_params(settings.attack_params))
            aggregators.build(settings.aggregator, num_byzantine=settings.num_byzantine,
                              pre=settings.pre_aggregation_list)
        except ValueError as exc:
            hint = ""
            if "has no parameter" in str(exc):
                hint = " (give each attack its own parameters: --attack-params 'sign-flip:scale=10;alie:z=1.5')"
            raise ValueError(f"sweep cell {cell.attack} x {cell.aggregator} (seed {cell.seed}): {exc}{hint}") from exc


# --------------------------------------------------------------------------------------------
# Cells on disk
# --------------------------------------------------------------------------------------------


@dataclass
class CellResult:
    """A cell's numbers as read back from its directory.

    ``status`` is ``"ok"`` (every round done), ``"failed"`` (the last attempt raised; ``error``
    says what), ``"incomplete"`` (a summary with rounds missing) or ``"missing"`` (never run).
    """

    cell: Cell
    status: str
    out: Path
    final_accuracy: float | None = None
    best_accuracy: float | None = None
    backdoor_asr: float | None = None
    detection: dict[str, float | None] = field(default_factory=dict)
    rounds_done: int = 0
    wall_seconds: float | None = None
    error: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> float | None:
        """``final_accuracy``, ``best_accuracy``, ``backdoor_asr``, or a detection key (``auroc``...)."""
        if name in ("auroc", "precision", "recall"):
            return self.detection.get(name)
        return getattr(self, name)

    def csv_row(self) -> dict[str, Any]:
        """The cell's results.csv row (empty strings for values it does not have)."""
        return {
            "attack": self.cell.attack,
            "aggregator": self.cell.aggregator,
            "seed": self.cell.seed,
            "status": self.status,
            "final_accuracy": _csv_number(self.final_accuracy),
            "best_accuracy": _csv_number(self.best_accuracy),
            "backdoor_asr": _csv_number(self.backdoor_asr),
            "detection_auroc": _csv_number(self.detection.get("auroc")),
            "detection_precision": _csv_number(self.detection.get("precision")),
            "detection_recall": _csv_number(self.detection.get("recall")),
            "rounds_done": self.rounds_done,
            "wall_seconds": _csv_number(self.wall_seconds),
            "out": str(self.out),
            "error": self.error,
        }


def _csv_number(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def read_cell(cell: Cell, sweep_dir: Path) -> CellResult:
    """Read one cell's ``summary.json`` (and ``error.txt``) back; never raises on a broken cell."""
    directory = cell.directory(sweep_dir)
    result = CellResult(cell=cell, status="missing", out=directory)
    summary = _load_summary(directory / "summary.json")
    if summary is not None:
        rounds = [r for r in summary.get("rounds", []) if isinstance(r, dict) and r.get("accuracy") is not None]
        result.config = dict(summary.get("config") or {})
        result.rounds_done = len(rounds)
        result.curve = [(int(r["round"]), float(r["accuracy"])) for r in rounds]
        result.final_accuracy = summary.get("final_accuracy")
        result.best_accuracy = summary.get("best_accuracy")
        result.backdoor_asr = summary.get("backdoor_asr")
        result.detection = dict(summary.get("detection") or {})
        result.wall_seconds = summary.get("wall_seconds")
        result.status = "ok" if _is_complete(summary) else "incomplete"
    error_file = directory / _ERROR_FILE
    if error_file.exists():
        # The numbers on disk, if any, are not this attempt's: report the failure alone.
        result = CellResult(cell=cell, status="failed", out=directory, rounds_done=result.rounds_done,
                            error=(error_file.read_text().strip().splitlines() or ["failed"])[0])
    return result


def _load_summary(path: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _is_complete(summary: dict) -> bool:
    """All rounds done, or stopped on purpose (a privacy budget spent)."""
    planned = (summary.get("config") or {}).get("rounds")
    done = len(summary.get("rounds") or [])
    return summary.get("stopped_early") is not None or (planned is not None and done >= int(planned))


def is_done(cell_dir: Path, config: dict[str, Any]) -> bool:
    """Whether a cell can be skipped: a complete summary.json, no error, written with these settings.

    Parameters
    ----------
    cell_dir : Path
    config : dict
        The cell's full run config (defaults and overrides); ``out`` and ``resume`` do not count.
    """
    from server.settings import RunSettings

    summary = _load_summary(Path(cell_dir) / "summary.json")
    if summary is None or (Path(cell_dir) / _ERROR_FILE).exists() or not _is_complete(summary):
        return False
    try:
        stored = RunSettings.from_run_config(summary.get("config") or {})
        wanted = RunSettings.from_run_config(config)
    except ValueError:  # written under another schema of run-config keys: run it again
        return False
    # The run's identity leaves rounds out (a resumed run may extend them); a cell's settings don't.
    return stored.config_hash() == wanted.config_hash() and stored.rounds == wanted.rounds


def record_failure(cell_dir: Path, exc: BaseException) -> str:
    """Write ``error.txt`` for a cell whose run raised; return its one-line description."""
    line = " <- ".join(f"{type(e).__name__}: {' '.join(str(e).split())}" for e in _exception_chain(exc))
    Path(cell_dir).mkdir(parents=True, exist_ok=True)
    (Path(cell_dir) / _ERROR_FILE).write_text(line + "\n\n" + "".join(traceback.format_exception(exc)))
    return line


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, Python, torch and flwr versions, and the device the runs train on."""
    import torch

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    try:
        flwr_version = metadata.version("flwr")
    except metadata.PackageNotFoundError:  # pragma: no cover - flwr is a dependency
        flwr_version = "?"
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "flwr": flwr_version, "device": device}


def command_line(args: argparse.Namespace, overrides: dict[str, Any]) -> str:
    """The ``python -m simulations sweep ...`` line that reproduces this sweep.

    ``--jobs`` and ``--cell-timeout`` are left out: they change how fast the grid runs, not
    what it computes.
    """
    parts = ["python", "-m", "simulations", "sweep", "--attacks", args.attacks, "--aggregators", args.aggregators,
             "--seeds", args.seeds]
    for key, value in overrides.items():
        parts += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    engine = getattr(args, "engine", None)
    if engine and engine != DEFAULT_ENGINE:
        parts += ["--engine", engine]
    if getattr(args, "verbose", False):
        parts.append("--verbose")
    return shlex.join(parts)


@contextlib.contextmanager
def _cell_output(cell_dir: Path, verbose: bool):
    """Send everything a cell prints (its round table, Flower's logs, native code) to its stdout.log.

    File descriptors 1 and 2 are redirected, not only ``sys.stdout``: a worker's output must not
    reach the sweep's terminal, where it would tear the live progress bar.
    """
    if verbose:
        yield
        return
    cell_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(cell_dir / _LOG_FILE, "w") as log_file:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def run_cell(overrides: dict[str, Any], cell: Cell, sweep_dir: Path, *, verbose: bool = False,
             engine: str = DEFAULT_ENGINE, ray_address: str | None = None) -> CellResult:
    """Run one cell's federation; a run that raises is recorded in its ``error.txt``, not raised.

    Returns
    -------
    CellResult
        Read back from the cell's directory (``status`` ``"failed"`` when the run raised or stopped
        short of its rounds).
    """
    from simulations.harness import run_federation

    cell_dir = cell.directory(sweep_dir)
    (cell_dir / _ERROR_FILE).unlink(missing_ok=True)
    try:
        with _cell_output(cell_dir, verbose):
            summary = run_federation(overrides, engine=engine, verbose=verbose, ray_address=ray_address)
        if not _is_complete(summary):
            raise RuntimeError(f"the run stopped after {len(summary.get('rounds') or [])} of "
                               f"{summary['config']['rounds']} rounds")
    except Exception as exc:  # one broken cell must not stop the grid: record it and go on
        record_failure(cell_dir, exc)
    return read_cell(cell, sweep_dir)


def warm_up_worker() -> None:
    """What a sweep worker imports once, before its first cell (seconds of torch, Flower, sklearn).

    Also pins BLAS pools to one thread: cells run side by side in several workers, and
    ``client.app`` already pins torch to one thread for the same reason.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    import torch

    import client.app  # noqa: F401  (torch, Flower's ClientApp, the data)
    import server.app  # noqa: F401  (the strategy, the aggregators, matplotlib for the report)
    import simulations.inprocess  # noqa: F401

    # The first optimizer a process builds imports torch._dynamo (about 2 s): pay it here, so
    # that the first cell's time (and the ETA drawn from it) is a cell's time.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def run_cell_task(payload: dict[str, Any]) -> None:
    """A worker's task: :func:`run_cell` on ``payload`` (from :func:`_cell_payload`)."""
    run_cell(payload["overrides"], Cell(**payload["cell"]), Path(payload["sweep_dir"]), verbose=payload["verbose"],
             engine=payload["engine"], ray_address=payload["ray_address"])


def _cell_payload(cell: Cell, overrides: dict[str, Any], sweep_dir: Path, *, verbose: bool, engine: str,
                  ray_address: str | None) -> dict[str, Any]:
    return {"overrides": overrides, "cell": {"attack": cell.attack, "aggregator": cell.aggregator, "seed": cell.seed},
            "sweep_dir": str(sweep_dir), "verbose": verbose, "engine": engine, "ray_address": ray_address}


def record_outcome(cell: Cell, sweep_dir: Path, outcome: Outcome) -> CellResult:
    """The cell's result after its worker reported ``outcome``; a timeout or a dead worker is a failure."""
    cell_dir = cell.directory(sweep_dir)
    if outcome.status == "timeout":
        record_failure(cell_dir, TimeoutError(f"the cell {outcome.detail}"))
    elif outcome.status == "died":
        record_failure(cell_dir, RuntimeError(f"the cell did not finish: {outcome.detail}"))
    elif outcome.status == "raised":  # run_cell records its own failures; this is the harness failing
        record_failure(cell_dir, RuntimeError(f"the sweep worker raised:\n{outcome.detail}"))
    return read_cell(cell, sweep_dir)


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``: this machine runs every 4th cell of the grid, starting at cell 2.

    Raises
    ------
    ValueError
        Unless the text is ``I/K`` with integers 0 <= I < K.
    """
    if not text:
        return 0, 1
    index, _, count = str(text).partition("/")
    try:
        i, k = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/K, e.g. 0/2 and 1/2 on two machines") from None
    if not 0 <= i < k:
        raise ValueError(f"--shard {text!r}: I must be in 0..K-1")
    return i, k


def default_jobs(engine: str) -> int:
    """Workers when ``--jobs`` is not given: every core in-process; one for Ray, which uses the cores itself."""
    return 1 if engine == "ray" else (os.cpu_count() or 1)


def sweep_command(args: argparse.Namespace, defaults: dict[str, Any], overrides: dict[str, Any]) -> int:
    """Run the grid ``--attacks`` x ``--aggregators`` x ``--seeds`` and write the result files.

    Parameters
    ----------
    args : argparse.Namespace
        ``attacks``, ``aggregators``, ``seeds`` (comma lists), ``verbose``, and optionally
        ``jobs`` (worker processes; default :func:`default_jobs`), ``cell_timeout`` (seconds,
        0 or None for no limit), ``engine``, ``ray_address`` and ``shard`` (``"I/K"``: run only
        cells I, I+K, I+2K... of the grid, so K machines sharing DIR split it; the tables always
        cover the whole grid, and a last run without ``shard`` completes them).
    defaults : dict
        Every run-config key with its default (``[tool.flwr.app.config]``).
    overrides : dict
        The run-config keys the user set; ``out`` (default ``defaults["out"]``) is the sweep's DIR.

    Returns
    -------
    int
        0 when every cell finished, 1 when some failed (they are in results.csv with their error).

    Raises
    ------
    ValueError
        For a bad grid (unknown attack or aggregator, a parameter an attack does not take, a bad
        seed...) or bad ``jobs``/``cell_timeout``/``engine``, before any cell runs.
    """
    from simulations.harness import check_engine
    from simulations.pool import WorkerPool

    engine = check_engine(getattr(args, "engine", None) or DEFAULT_ENGINE)
    ray_address = getattr(args, "ray_address", None)
    jobs = getattr(args, "jobs", None) or default_jobs(engine)
    cell_timeout = getattr(args, "cell_timeout", None)
    sweep_dir = Path(str(overrides.get("out", defaults["out"]))).expanduser().resolve()
    attacks = split_names(args.attacks, "--attacks")
    aggregator_names = split_names(args.aggregators, "--aggregators")
    seeds = parse_seeds(args.seeds)
    attack_params = parse_attack_params(str(overrides.get("attack-params", "")), attacks)
    base = {k: v for k, v in overrides.items() if k not in ("out", "attack-params")}
    cells = [Cell(a, g, s) for a in attacks for g in aggregator_names for s in seeds]
    shard, shards = parse_shard(getattr(args, "shard", None))
    mine = set(cells[shard::shards])
    configs = {cell: cell_overrides(base, cell, attack_params, sweep_dir) for cell in cells}
    validate_grid(cells, {cell: defaults | configs[cell] for cell in cells})
    pool = WorkerPool(jobs, "simulations.sweep:run_cell_task", warm_up="simulations.sweep:warm_up_worker",
                      task_timeout=cell_timeout)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_json(sweep_dir / _SWEEP_FILE, {
        "command": command_line(args, overrides),
        "attacks": attacks, "aggregators": aggregator_names, "seeds": seeds,
        "attack_params": attack_params, "settings": base, "machine": machine_info(),
        "engine": engine, "jobs": jobs, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    done = {cell for cell in cells if is_done(cell.directory(sweep_dir), defaults | configs[cell])}
    todo = [cell for cell in cells if cell not in done and cell in mine]
    print(f"sweep: {len(attacks)} attacks x {len(aggregator_names)} aggregators x {len(seeds)} seeds = "
          f"{len(cells)} cells ({len(done)} done before"
          + (f"; shard {shard}/{shards}: {len(mine)} of them" if shards > 1 else "")
          + f"), {min(jobs, len(todo))} workers, engine {engine} -> {sweep_dir}", file=sys.stderr, flush=True)
    results: dict[Cell, CellResult] = {}
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt) if _in_main_thread() else None
    try:
        with sweep_progress(len(mine), len(todo), jobs=min(jobs, max(len(todo), 1)), verbose=args.verbose) as progress:
            for cell in cells:
                if cell in done and cell in mine:
                    results[cell] = read_cell(cell, sweep_dir)
                    progress.finish(results[cell], ran_seconds=None)

            def on_end(cell: Cell, outcome: Outcome) -> None:
                results[cell] = record_outcome(cell, sweep_dir, outcome)
                progress.finish(results[cell], ran_seconds=outcome.seconds)

            pool.run([(cell, _cell_payload(cell, configs[cell], sweep_dir, verbose=args.verbose, engine=engine,
                                           ray_address=ray_address)) for cell in todo],
                     on_start=lambda cell: progress.start(cell, newline=args.verbose), on_end=on_end)
    finally:  # an interrupted sweep still leaves the tables of the cells it finished
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        written = write_outputs(sweep_dir)
    ordered = [results[cell] for cell in cells if cell in results]
    failed = [r for r in ordered if r.status != "ok"]
    print(f"sweep: {len(ordered) - len(failed)} of {len(mine)} cells ok; wrote "
          + ", ".join(p.name for p in written.values()) + f" in {sweep_dir}", file=sys.stderr, flush=True)
    for result in failed:
        print(f"  {result.status}: {result.cell.name}: {result.error}", file=sys.stderr)
    return 1 if failed else 0


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    # SIGTERM ends the sweep like Ctrl-C: workers stopped, tables of the finished cells written.
    raise KeyboardInterrupt(f"signal {signum}")


def _write_json(path: Path, payload: dict) -> None:
    from server.run import write_json

    write_json(path, payload)  # strict JSON (no NaN), atomically


# --------------------------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------------------------


@dataclass
class SweepGrid:
    """What :func:`write_outputs` reports on: the grid, with the command and machine when known."""

    attacks: list[str]
    aggregators: list[str]
    seeds: list[int]
    command: str | None = None
    machine: dict[str, Any] | None = None

    @property
    def cells(self) -> list[Cell]:
        """Every cell, attack-major, in the order of the command line."""
        return [Cell(a, g, s) for a in self.attacks for g in self.aggregators for s in self.seeds]


def load_grid(sweep_dir: Path) -> SweepGrid:
    """The grid of ``DIR/sweep.json``, or, without it, the one the cell directories spell.

    Raises
    ------
    ValueError
        If ``DIR`` holds neither sweep.json nor cell directories.
    """
    sweep_dir = Path(sweep_dir)
    spec = _load_summary(sweep_dir / _SWEEP_FILE)
    if spec is not None:
        return SweepGrid(list(spec["attacks"]), list(spec["aggregators"]), [int(s) for s in spec["seeds"]],
                         spec.get("command"), spec.get("machine"))
    parsed = []
    for path in sorted((sweep_dir / "cells").glob("*__*__*")):
        attack, aggregator, seed = path.name.rsplit("__", 2)
        if seed.lstrip("-").isdigit():
            parsed.append((attack, aggregator, int(seed)))
    if not parsed:
        raise ValueError(f"{sweep_dir} holds no {_SWEEP_FILE} and no cells/<attack>__<aggregator>__<seed> directories")
    attacks = sorted({p[0] for p in parsed}, key=lambda a: (a != NO_ATTACK, a))
    return SweepGrid(attacks, sorted({p[1] for p in parsed}), sorted({p[2] for p in parsed}))


def accuracy_table(results: Sequence[CellResult], attacks: Sequence[str],
                   aggregators: Sequence[str], metric: str = "final_accuracy") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard deviation and count over seeds of one metric, attacks x aggregators.

    Only cells with status ``ok`` count; a (attack, aggregator) with none is NaN. The standard
    deviation is the sample one (``ddof=1``), 0 for a single seed.

    Returns
    -------
    tuple of ndarray
        ``(mean, std, count)``, each of shape ``(len(attacks), len(aggregators))``.
    """
    shape = (len(attacks), len(aggregators))
    mean, std, count = np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, dtype=int)
    for i, attack in enumerate(attacks):
        for j, aggregator in enumerate(aggregators):
            values = [r.metric(metric) for r in results
                      if r.cell.attack == attack and r.cell.aggregator == aggregator and r.status == "ok"]
            values = np.array([v for v in values if v is not None], dtype=float)
            count[i, j] = values.size
            if values.size:
                mean[i, j] = values.mean()
                std[i, j] = values.std(ddof=1) if values.size > 1 else 0.0
    return mean, std, count


def worst_case(mean: np.ndarray, attacks: Sequence[str]) -> np.ndarray | None:
    """Per aggregator, its lowest mean accuracy over the attacks (``none`` left out).

    An aggregator with a missing or failed attack has an unknown worst case (NaN). Returns None
    when the grid has no attack besides ``none``.
    """
    rows = [i for i, attack in enumerate(attacks) if attack != NO_ATTACK]
    if not rows:
        return None
    return mean[rows].min(axis=0)  # NaN propagates: a failed attack leaves the worst case unknown


def write_outputs(out_dir: Path | str) -> dict[str, Path]:
    """Rebuild results.csv, heatmap.png, curves.png and results.md from the cells on disk.

    Parameters
    ----------
    out_dir : Path or str
        The sweep's DIR (holding ``sweep.json`` and ``cells/``).

    Returns
    -------
    dict
        ``{"csv": ..., "heatmap": ..., "curves": ..., "markdown": ...}`` paths.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    grid = load_grid(out_dir)
    results = [read_cell(cell, out_dir) for cell in grid.cells]
    written = {"csv": out_dir / "results.csv", "heatmap": out_dir / "heatmap.png",
               "curves": out_dir / "curves.png", "markdown": out_dir / "results.md"}
    _write_csv(results, written["csv"])
    _write_heatmap(results, grid, written["heatmap"])
    _write_curves(results, grid, written["curves"])
    written["markdown"].write_text(results_markdown(results, grid))
    return written


def _write_csv(results: Sequence[CellResult], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerow(result.csv_row())


def _write_heatmap(results: Sequence[CellResult], grid: SweepGrid, path: Path) -> None:
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend state; savefig renders with Agg

    mean, _, _ = accuracy_table(results, grid.attacks, grid.aggregators)
    worst = worst_case(mean, grid.attacks)
    rows = list(grid.attacks) + ([WORST_CASE] if worst is not None else [])
    matrix = np.vstack([mean, worst[None, :]]) if worst is not None else mean
    fig = Figure(figsize=(1.6 + 1.1 * len(grid.aggregators), 1.2 + 0.5 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")  # grey: failed or missing
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j]
            ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=9,
                    fontweight="bold" if rows[i] == WORST_CASE else "normal")
    if worst is not None:
        ax.axhline(len(grid.attacks) - 0.5, color="black", linewidth=2)
    ax.set_xticks(range(len(grid.aggregators)), grid.aggregators, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("aggregator")
    ax.set_ylabel("attack")
    seeds = ", ".join(map(str, grid.seeds))
    ax.set_title(f"final accuracy, mean over seeds {seeds}", fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.savefig(path, dpi=120)


def _write_curves(results: Sequence[CellResult], grid: SweepGrid, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = min(3, len(grid.attacks))
    panel_rows = math.ceil(len(grid.attacks) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * panel_rows), layout="constrained")
    axes = fig.subplots(panel_rows, columns, squeeze=False, sharey=True)
    for index, attack in enumerate(grid.attacks):
        ax = axes[index // columns][index % columns]
        for aggregator in grid.aggregators:
            by_round: dict[int, list[float]] = {}
            for r in results:
                if r.cell.attack == attack and r.cell.aggregator == aggregator and r.status == "ok":
                    for round_number, accuracy in r.curve:
                        by_round.setdefault(round_number, []).append(accuracy)
            if by_round:
                xs = sorted(by_round)
                ax.plot(xs, [np.mean(by_round[x]) for x in xs], marker="o", markersize=3, label=aggregator)
        ax.set_title(attack if attack != NO_ATTACK else "none (clean)", fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        if index % columns == 0:
            ax.set_ylabel("test accuracy")
    for index in range(len(grid.attacks), panel_rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=9)
    fig.suptitle(f"accuracy per round, mean over seeds {', '.join(map(str, grid.seeds))}", fontsize=11)
    fig.savefig(path, dpi=120)


def results_markdown(results: Sequence[CellResult], grid: SweepGrid) -> str:
    """The results.md text: tables of mean +- std over seeds, failures, command line and machine."""
    seeds = ", ".join(map(str, grid.seeds))
    lines = ["# Sweep results", ""]
    if grid.command:
        lines += ["Command:", "", "```", grid.command, "```", ""]
    if grid.machine:
        m = grid.machine
        lines += [f"Machine: {m.get('platform')}, {m.get('cpu_count')} CPUs, Python {m.get('python')}, "
                  f"torch {m.get('torch')}, flwr {m.get('flwr')}, device {m.get('device')}.", ""]
    ok = sum(r.status == "ok" for r in results)
    wall = sum(r.wall_seconds or 0.0 for r in results if r.status == "ok")
    lines += [f"{ok} of {len(results)} cells finished; {wall / 60:.1f} min of simulation in all. Values are "
              f"mean ± std over seeds {seeds} (a cell that failed or did not finish is left out).", ""]
    lines += _markdown_table("Final accuracy", results, grid, "final_accuracy", with_worst_case=True)
    lines += _markdown_table("Best accuracy over rounds", results, grid, "best_accuracy", with_worst_case=False)
    if any(r.backdoor_asr is not None for r in results):
        lines += _markdown_table("Backdoor attack success rate", results, grid, "backdoor_asr",
                                 with_worst_case=False, measured_rows_only=True)
    if any(r.detection.get("auroc") is not None for r in results):
        lines += _markdown_table("Detection AUROC (attackers vs honest clients)", results, grid, "auroc",
                                 with_worst_case=False, measured_rows_only=True)
        lines += _markdown_table("Flag precision (flagged (node, round) pairs that were attackers)", results, grid,
                                 "precision", with_worst_case=False, measured_rows_only=True)
        lines += _markdown_table("Flag recall (attackers' (node, round) pairs that were flagged)", results, grid,
                                 "recall", with_worst_case=False, measured_rows_only=True)
    problems = [r for r in results if r.status != "ok"]
    if problems:
        lines += ["## Cells without results", ""]
        lines += [f"- `{r.cell.name}`: {r.status}" + (f": {r.error}" if r.error else "") for r in problems]
        lines.append("")
    return "\n".join(lines)


def _markdown_table(title: str, results: Sequence[CellResult], grid: SweepGrid, metric: str, *,
                    with_worst_case: bool, measured_rows_only: bool = False) -> list[str]:
    """One markdown table of ``metric``; ``measured_rows_only`` drops attacks with no value in any
    cell (no backdoor ASR without a backdoor, no detection without attackers)."""
    mean, std, count = accuracy_table(results, grid.attacks, grid.aggregators, metric)
    lines = [f"## {title}", "", "| attack \\ aggregator | " + " | ".join(grid.aggregators) + " |",
             "|---|" + "---|" * len(grid.aggregators)]
    for i, attack in enumerate(grid.attacks):
        if measured_rows_only and not count[i].any():
            continue
        cells = [_mean_std(mean[i, j], std[i, j], count[i, j]) for j in range(len(grid.aggregators))]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    worst = worst_case(mean, grid.attacks) if with_worst_case else None
    if worst is not None:
        lines.append(f"| **{WORST_CASE}** | " + " | ".join("n/a" if np.isnan(w) else f"**{w:.3f}**" for w in worst)
                     + " |")
    return lines + [""]


def _mean_std(mean: float, std: float, count: int) -> str:
    if count == 0 or np.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if count == 1 else f"{mean:.3f} ± {std:.3f}"
