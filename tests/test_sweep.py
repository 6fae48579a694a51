"""``python -m simulations sweep``: the grid attacks x aggregators x seeds and its result files.

Specification: a 2 x 2 grid (attacks none, sign-flip x aggregators mean, median, seed 0), run in two
worker processes, writes results.csv with one row per cell, heatmap.png, curves.png and results.md;
a cell's numbers are those of the same federation run directly; under sign-flip the mean collapses
while the median holds; a rerun skips every finished cell without simulating; a sweep killed with
SIGKILL midway leaves no worker behind and a rerun finishes only what is missing; ``--shard I/K``
runs every K-th cell; a cell past ``--cell-timeout`` is recorded as failed and the sweep goes on;
per-attack parameters reach only their attack; an aggregator ``nnm+trimmed-mean`` runs trimmed-mean
behind the nnm pre-aggregation; a cell that raises is recorded as failed and reported, not raised; a
bad grid is refused before any cell runs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import aggregators
from simulations.__main__ import main
from simulations.harness import default_config, run_federation
from simulations.progress import LiveSweepProgress, RoundProgress, SweepProgress, sweep_progress
from simulations.sweep import (
    CSV_COLUMNS, Cell, CellResult, cell_overrides, is_done, parse_attack_params, parse_seeds, parse_shard,
    SweepGrid, read_cell, record_failure, results_markdown, run_cell, split_aggregator, split_names, worst_case,
    write_outputs,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["--num-clients", "6", "--num-malicious", "1", "--rounds", "2"]


def sweep_argv(out: Path) -> list[str]:
    return ["sweep", "--attacks", "none,sign-flip", "--aggregators", "mean,median", "--seeds", "0", *SMALL,
            "--attack-params", "sign-flip:scale=10", "--jobs", "2", "--out", str(out)]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """The 2 x 2 grid, run for real (four federations in two workers, a few seconds each)."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    assert main(sweep_argv(out)) == 0
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- the grid, end to end


def test_grid_writes_one_row_per_cell_and_every_result_file(sweep_dir):
    rows = read_rows(sweep_dir / "results.csv")
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert sorted((r["attack"], r["aggregator"], r["seed"]) for r in rows) == [
        ("none", "mean", "0"), ("none", "median", "0"), ("sign-flip", "mean", "0"), ("sign-flip", "median", "0")]
    for row in rows:
        assert row["status"] == "ok" and row["error"] == ""
        assert 0.0 <= float(row["final_accuracy"]) <= float(row["best_accuracy"]) <= 1.0
        assert row["rounds_done"] == "2" and float(row["wall_seconds"]) > 0
        assert (Path(row["out"]) / "summary.json").exists()
    for figure in ("heatmap.png", "curves.png"):
        data = (sweep_dir / figure).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    # Detection quality exists only where there are attackers to detect.
    by_attack = {r["attack"]: r for r in rows if r["aggregator"] == "median"}
    assert by_attack["none"]["detection_auroc"] == "" and by_attack["sign-flip"]["detection_auroc"] != ""


def test_sign_flip_breaks_the_mean_and_the_median_holds(sweep_dir):
    final = {(r["attack"], r["aggregator"]): float(r["final_accuracy"]) for r in read_rows(sweep_dir / "results.csv")}
    assert final[("none", "mean")] >= 0.8
    assert final[("sign-flip", "mean")] < 0.5
    assert final[("sign-flip", "median")] >= final[("none", "mean")] - 0.1


def test_results_md_has_the_tables_the_worst_case_the_command_and_the_machine(sweep_dir):
    text = (sweep_dir / "results.md").read_text()
    final = {(r["attack"], r["aggregator"]): float(r["final_accuracy"]) for r in read_rows(sweep_dir / "results.csv")}
    assert "| attack \\ aggregator | mean | median |" in text
    worst_line = next(line for line in text.splitlines() if line.startswith("| **worst case**"))
    # The worst case leaves the clean row out: it is the sign-flip row here.
    assert f"**{final[('sign-flip', 'mean')]:.3f}**" in worst_line
    assert f"**{final[('sign-flip', 'median')]:.3f}**" in worst_line
    assert "python -m simulations sweep --attacks none,sign-flip --aggregators mean,median --seeds 0" in text
    assert "--attack-params sign-flip:scale=10" in text
    assert f"torch {torch.__version__}" in text and "CPUs" in text and "device cpu" in text


def test_each_cell_ran_with_its_own_attack_settings(sweep_dir):
    clean = json.loads((sweep_dir / "cells" / "none__mean__0" / "summary.json").read_text())["config"]
    attacked = json.loads((sweep_dir / "cells" / "sign-flip__median__0" / "summary.json").read_text())["config"]
    assert (clean["attack"], clean["num-malicious"], clean["attack-params"]) == ("none", 0, "")
    assert (attacked["attack"], attacked["num-malicious"], attacked["attack-params"]) == ("sign-flip", 1, "scale=10")
    assert attacked["aggregator"] == "median" and attacked["rounds"] == 2 and attacked["num-clients"] == 6


def test_a_cell_in_a_worker_gives_the_numbers_of_the_same_federation_run_directly(sweep_dir, tmp_path):
    """Long-lived workers carry nothing from one cell to the next that changes a result."""
    cell = Cell("sign-flip", "median", 0)
    params = {"none": "", "sign-flip": "scale=10"}
    overrides = cell_overrides({"num-clients": 6, "num-malicious": 1, "rounds": 2}, cell, params, tmp_path)
    direct = run_federation(overrides)
    in_sweep = json.loads((cell.directory(sweep_dir) / "summary.json").read_text())
    assert [r["accuracy"] for r in in_sweep["rounds"]] == [r["accuracy"] for r in direct["rounds"]]
    assert [r["scores"] for r in in_sweep["rounds"]] == [r["scores"] for r in direct["rounds"]]
    assert json.loads((sweep_dir / "sweep.json").read_text())["jobs"] == 2


def test_rerun_skips_every_finished_cell_without_simulating(sweep_dir):
    summaries = sorted((sweep_dir / "cells").glob("*/summary.json"))
    assert len(summaries) == 4
    before = {p: p.stat().st_mtime_ns for p in summaries}
    started = time.perf_counter()
    assert main(sweep_argv(sweep_dir)) == 0
    assert time.perf_counter() - started < 10  # one simulation alone starts Ray for longer than this
    assert {p: p.stat().st_mtime_ns for p in summaries} == before
    assert len(read_rows(sweep_dir / "results.csv")) == 4


def test_a_cell_with_other_settings_is_not_counted_as_done(sweep_dir):
    defaults = default_config()
    cell = Cell("sign-flip", "mean", 0)
    base = {"num-clients": 6, "num-malicious": 1, "rounds": 2}
    params = {"none": "", "sign-flip": "scale=10"}
    same = defaults | cell_overrides(base, cell, params, sweep_dir)
    assert is_done(cell.directory(sweep_dir), same)
    assert not is_done(cell.directory(sweep_dir), same | {"rounds": 3})
    assert not is_done(cell.directory(sweep_dir), same | {"attack-params": "scale=5"})


def test_write_outputs_rebuilds_the_tables_from_the_cells(sweep_dir, tmp_path):
    copy = tmp_path / "grid"
    shutil.copytree(sweep_dir, copy)
    for name in ("results.csv", "heatmap.png", "curves.png", "results.md"):
        (copy / name).unlink()
    written = write_outputs(copy)
    assert all(path.exists() for path in written.values())
    rebuilt = read_rows(copy / "results.csv")
    original = read_rows(sweep_dir / "results.csv")
    assert [{k: v for k, v in r.items() if k != "out"} for r in rebuilt] == \
           [{k: v for k, v in r.items() if k != "out"} for r in original]


def test_a_failed_cell_is_reported_and_leaves_its_worst_case_unknown(sweep_dir, tmp_path):
    copy = tmp_path / "grid"
    shutil.copytree(sweep_dir, copy)
    failing_cell = Cell("sign-flip", "mean", 0)
    with pytest.raises(ValueError) as caught:  # a real failure: Krum cannot tolerate f = 2 among 4 updates
        aggregators.build("krum", num_byzantine=2)(torch.zeros(4, 3))
    record_failure(failing_cell.directory(copy), caught.value)
    write_outputs(copy)
    row = next(r for r in read_rows(copy / "results.csv") if (r["attack"], r["aggregator"]) == ("sign-flip", "mean"))
    assert row["status"] == "failed" and row["error"].startswith("ValueError") and "krum" in row["error"].lower()
    assert row["final_accuracy"] == "" and row["detection_auroc"] == ""  # the old run's numbers are not reported
    text = (copy / "results.md").read_text()
    worst_line = next(line for line in text.splitlines() if line.startswith("| **worst case**"))
    assert worst_line.split("|")[2].strip() == "n/a"
    assert "## Cells without results" in text and "sign-flip__mean__0" in text


def _session_processes(session: int) -> list[int]:
    """Pids of the live processes of a session (the sweep and every worker it spawned)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_sweep_killed_midway_leaves_no_worker_and_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "grid"
    argv = sweep_argv(out)
    argv[argv.index("--jobs") + 1] = "1"
    process = subprocess.Popen([sys.executable, "-m", "simulations", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    defaults = default_config()
    params = {"none": "", "sign-flip": "scale=10"}
    base = {"num-clients": 6, "num-malicious": 1, "rounds": 2}
    cells = [Cell(a, g, 0) for a in ("none", "sign-flip") for g in ("mean", "median")]
    try:
        deadline = time.monotonic() + 240
        while not any(is_done(c.directory(out), defaults | cell_overrides(base, c, params, out)) for c in cells):
            assert process.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "the sweep finished no cell"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)  # the sweep only: its worker must notice by itself
        process.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _session_processes(process.pid) == [], "a worker outlived its killed sweep"
    finally:
        if _session_processes(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
    finished = {c: c.directory(out) / "summary.json" for c in cells
                if is_done(c.directory(out), defaults | cell_overrides(base, c, params, out))}
    assert 1 <= len(finished) < len(cells)
    before = {c: path.stat().st_mtime_ns for c, path in finished.items()}

    assert main(sweep_argv(out)) == 0
    assert {c: path.stat().st_mtime_ns for c, path in finished.items()} == before  # not run again
    rows = read_rows(out / "results.csv")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)


def test_a_shard_runs_every_kth_cell_and_the_tables_cover_the_grid(tmp_path):
    out = tmp_path / "grid"
    assert main(sweep_argv(out) + ["--shard", "1/2"]) == 0
    status = {(r["attack"], r["aggregator"]): r["status"] for r in read_rows(out / "results.csv")}
    # Cells in grid order: none x mean, none x median, sign-flip x mean, sign-flip x median.
    assert status == {("none", "mean"): "missing", ("none", "median"): "ok",
                      ("sign-flip", "mean"): "missing", ("sign-flip", "median"): "ok"}
    assert parse_shard("0/3") == (0, 3) and parse_shard(None) == (0, 1)
    for bad in ("2/2", "x/2", "1"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_a_cell_past_the_timeout_is_failed_and_the_sweep_goes_on(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["sweep", "--attacks", "none", "--aggregators", "mean,median", "--num-clients", "6", "--rounds", "500",
            "--jobs", "1", "--cell-timeout", "2", "--out", str(out)]
    started = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - started < 120  # two cells of 500 rounds did not run to the end
    rows = {r["aggregator"]: r for r in read_rows(out / "results.csv")}
    for aggregator in ("mean", "median"):  # the second ran on a fresh worker after the first was killed
        assert rows[aggregator]["status"] == "failed"
        assert rows[aggregator]["error"].startswith("TimeoutError: the cell ran past the timeout of 2 s")
    assert "failed: none__median__0: TimeoutError" in capsys.readouterr().err


# ---------------------------------------------------------------- cells and names, no simulation


def test_a_cell_that_raises_is_recorded_not_raised(tmp_path):
    cell = Cell("sign-flip", "mean", 0)
    # run_federation refuses an unknown run-config key before starting the engine.
    result = run_cell({"no-such-key": 1, "out": str(cell.directory(tmp_path))}, cell, tmp_path)
    assert result.status == "failed" and "no-such-key" in result.error
    assert "Traceback" in (cell.directory(tmp_path) / "error.txt").read_text()
    assert read_cell(cell, tmp_path).status == "failed"


def test_per_attack_params_reach_only_their_attack():
    attacks = ["none", "sign-flip", "backdoor", "alie"]
    params = parse_attack_params("sign-flip:scale=10; backdoor:boost=5,target=0", attacks)
    assert params == {"none": "", "sign-flip": "scale=10", "backdoor": "boost=5,target=0", "alie": ""}


def test_plain_params_go_to_every_attack_but_none():
    assert parse_attack_params("scale=10", ["none", "sign-flip", "scaling"]) == \
           {"none": "", "sign-flip": "scale=10", "scaling": "scale=10"}
    assert parse_attack_params("", ["sign-flip"]) == {"sign-flip": ""}


@pytest.mark.parametrize("text, message", [
    ("alie:z=1", "not in --attacks"),
    ("none:scale=1", "takes no parameters"),
    ("sign-flip:scale=1;sign-flip:scale=2", "twice"),
    ("sign-flip:scale=1;scale=2", "mixes"),
])
def test_bad_per_attack_params_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_attack_params(text, ["none", "sign-flip"])


def test_nnm_plus_trimmed_mean_runs_trimmed_mean_behind_nnm(tmp_path):
    assert split_aggregator("nnm+trimmed-mean") == ("trimmed-mean", "nnm")
    assert split_aggregator("clip+nnm+krum") == ("krum", "clip,nnm")
    assert split_aggregator("median") == ("median", "")
    overrides = cell_overrides({"pre-aggregation": "bucketing"}, Cell("alie", "nnm+trimmed-mean", 3),
                               {"alie": "z=1.5"}, tmp_path)
    assert overrides["aggregator"] == "trimmed-mean" and overrides["pre-aggregation"] == "nnm"
    assert overrides["attack-params"] == "z=1.5" and overrides["seed"] == 3
    assert overrides["out"] == str(tmp_path / "cells" / "alie__nnm+trimmed-mean__3")
    # Without '+', the sweep-wide pre-aggregation stays.
    assert cell_overrides({"pre-aggregation": "bucketing"}, Cell("alie", "median", 0), {}, tmp_path)[
        "pre-aggregation"] == "bucketing"
    with pytest.raises(ValueError, match="nnm\\+"):
        split_aggregator("nnm+")


def test_attack_none_runs_without_attackers(tmp_path):
    overrides = cell_overrides({"num-malicious": 3}, Cell("none", "mean", 0), {"none": ""}, tmp_path)
    assert overrides["num-malicious"] == 0 and overrides["attack"] == "none"


def test_names_and_seeds_are_checked():
    assert split_names(" a, b ,c", "--attacks") == ["a", "b", "c"]
    assert parse_seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match="more than once"):
        split_names("mean,mean", "--aggregators")
    with pytest.raises(ValueError, match="at least one"):
        split_names(" , ", "--attacks")
    with pytest.raises(ValueError, match="'x' is not an integer"):
        parse_seeds("0,x")


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "no-such-attack", "--aggregators", "mean"], "no-such-attack"),
    (["--attacks", "sign-flip", "--aggregators", "no-such-rule"], "no-such-rule"),
    (["--attacks", "sign-flip,alie", "--aggregators", "mean", "--attack-params", "scale=10", "--num-malicious", "2"],
     "alie:z="),
    (["--attacks", "sign-flip", "--aggregators", "mean", "--rounds", "0"], "rounds must be >= 1"),
])
def test_a_bad_grid_is_refused_before_any_cell_runs(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        main(["sweep", *extra, "--out", str(tmp_path / "grid")])
    assert not (tmp_path / "grid").exists()


def test_worst_case_is_the_lowest_attack_per_aggregator_leaving_none_out():
    mean = np.array([[0.95, 0.90], [0.10, 0.85], [0.60, np.nan]])
    worst = worst_case(mean, ["none", "sign-flip", "alie"])
    assert worst[0] == pytest.approx(0.10) and np.isnan(worst[1])
    assert worst_case(mean[:1], ["none"]) is None


def test_progress_shows_index_accuracy_elapsed_and_eta(tmp_path):
    stream = io.StringIO()  # not a terminal: plain lines
    progress = sweep_progress(total=3, to_run=2, jobs=1, stream=stream)
    assert type(progress) is SweepProgress
    cell = Cell("sign-flip", "median", 0)
    progress.start(cell, newline=False)
    progress.finish(CellResult(cell, "ok", tmp_path, final_accuracy=0.91234), ran_seconds=30.0)
    progress.start(Cell("none", "median", 0), newline=False)
    progress.finish(CellResult(Cell("none", "median", 0), "ok", tmp_path, final_accuracy=0.95), ran_seconds=None)
    first, second = stream.getvalue().splitlines()
    assert "1/3 sign-flip x median, seed 0: final accuracy 0.9123 (30.0 s)" in first
    assert "ETA 0:30" in first  # one cell left to run, at 30 s a cell
    assert "2/3" in second and "skipped" in second and "ETA 0:30" in second


def test_the_eta_counts_the_workers_and_the_live_bar_prints_each_ran_cell(tmp_path):
    parallel = SweepProgress(total=5, to_run=5, stream=io.StringIO(), jobs=2)
    parallel.finish(CellResult(Cell("none", "mean", 0), "ok", tmp_path, final_accuracy=0.9), ran_seconds=10.0)
    assert parallel.eta() == "0:20"  # four cells left at 10 s each, two at a time

    stream = io.StringIO()
    with LiveSweepProgress(total=4, to_run=2, stream=stream, jobs=2) as live:
        for seed in (0, 1):
            live.finish(CellResult(Cell("none", "mean", seed), "ok", tmp_path, final_accuracy=0.9), ran_seconds=None)
        live.start(Cell("alie", "krum", 0))
        assert live.running == ["alie x krum, seed 0"]
        live.finish(CellResult(Cell("alie", "krum", 0), "failed", tmp_path, error="ValueError: boom"), ran_seconds=4.0)
    lines = stream.getvalue().splitlines()
    assert "2 cells done before: skipped" in lines
    assert any("3/4 alie x krum, seed 0: FAILED (ValueError: boom) (4.0 s)" in line for line in lines)
    assert live.failed == 1 and live.running == []


def test_a_single_run_shows_no_bar_off_a_terminal():
    stream = io.StringIO()
    with RoundProgress(3, stream=stream) as progress:
        progress.client_done(1, 2, 4)
        progress.round_done(1)
    assert not progress.live and stream.getvalue() == ""


def test_asr_and_detection_tables_list_only_attacks_that_have_them(tmp_path):
    grid = SweepGrid(attacks=["none", "sign-flip", "backdoor"], aggregators=["mean", "median"], seeds=[0])
    results = []
    for cell in grid.cells:
        attacked = cell.attack != "none"
        results.append(CellResult(
            cell, "ok", tmp_path, final_accuracy=0.9, best_accuracy=0.9,
            backdoor_asr=0.7 if cell.attack == "backdoor" else None,
            detection={"auroc": 0.8, "precision": 0.5, "recall": 0.4} if attacked else {}))
    text = results_markdown(results, grid)

    def rows(title: str) -> list[str]:
        section = text[text.index(f"## {title}"):]
        section = section[:section.find("\n## ", 3)] if "\n## " in section[3:] else section
        return [line.split(" | ")[0].removeprefix("| ") for line in section.splitlines()[4:] if line.startswith("| ")]

    assert rows("Final accuracy") == ["none", "sign-flip", "backdoor", "**worst case**"]
    assert rows("Backdoor attack success rate") == ["backdoor"]
    assert rows("Detection AUROC") == ["sign-flip", "backdoor"]
    assert rows("Flag recall") == ["sign-flip", "backdoor"]
