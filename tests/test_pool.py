"""The sweep's worker pool: long-lived spawned workers, a timeout per task, failures contained.

Specification: every task runs once, in at most ``jobs`` worker processes that live across
tasks; a task past the timeout has its worker killed and replaced, and is reported as
``timeout``; a task that raises is reported with its traceback; a task whose worker dies is
reported with the exit code; in every case the remaining tasks still run. A worker whose parent
is killed with SIGKILL exits by itself. Tasks are real functions in tests/pool_tasks.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from simulations.pool import WorkerPool

TASKS = "pool_tasks:dispatch"


def task(tmp_path: Path, key: str, kind: str = "record", **payload) -> tuple[str, dict]:
    return key, {"task": kind, "value": len(key), "out": str(tmp_path / f"{key}.json"), **payload}


def written(tmp_path: Path, key: str) -> dict:
    return json.loads((tmp_path / f"{key}.json").read_text())


def test_every_task_runs_once_in_at_most_jobs_long_lived_workers(tmp_path):
    tasks = [task(tmp_path, "a" * n) for n in range(1, 7)]
    started: list[str] = []
    outcomes = WorkerPool(2, TASKS).run(tasks, on_start=started.append)
    assert sorted(outcomes) == sorted(key for key, _ in tasks) == sorted(started)
    assert all(o.status == "done" and o.seconds >= 0 for o in outcomes.values())
    pids = {written(tmp_path, key)["pid"] for key, _ in tasks}
    assert written(tmp_path, "aaa")["square"] == 9
    # At most two long-lived workers did all six (how the six split between them depends on how
    # fast each started), none of them in this process.
    assert 1 <= len(pids) <= 2 < len(tasks) and os.getpid() not in pids


def test_a_task_past_the_timeout_is_killed_reported_and_its_worker_replaced(tmp_path):
    tasks = [task(tmp_path, "slow", sleep=60), task(tmp_path, "after", sleep=0)]
    started = time.monotonic()
    outcomes = WorkerPool(1, TASKS, task_timeout=1.5).run(tasks)
    assert time.monotonic() - started < 45  # not the 60 s the slow task asked for
    assert outcomes["slow"].status == "timeout" and "1.5 s" in outcomes["slow"].detail
    assert 1.5 <= outcomes["slow"].seconds < 10
    assert not (tmp_path / "slow.json").exists()
    assert outcomes["after"].status == "done" and (tmp_path / "after.json").exists()


def test_a_task_that_raises_or_kills_its_worker_is_reported_and_the_rest_still_run(tmp_path):
    tasks = [task(tmp_path, "raises", "fail"), task(tmp_path, "dies", "die", code=7), task(tmp_path, "fine")]
    outcomes = WorkerPool(1, TASKS).run(tasks)
    assert outcomes["raises"].status == "raised"
    assert "ValueError: task 6 refuses to run" in outcomes["raises"].detail
    assert outcomes["dies"].status == "died" and "exit code 7" in outcomes["dies"].detail
    assert outcomes["fine"].status == "done" and written(tmp_path, "fine")["square"] == 16


def test_bad_jobs_and_timeouts_are_refused():
    with pytest.raises(ValueError, match="--jobs must be >= 1, got 0"):
        WorkerPool(0, TASKS)
    with pytest.raises(ValueError, match="--cell-timeout must be >= 0"):
        WorkerPool(1, TASKS, task_timeout=-1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_their_parent_is_killed(tmp_path):
    parent = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from simulations.pool import WorkerPool
        if __name__ == "__main__":
            WorkerPool(1, {TASKS!r}).run([("long", {{"task": "record", "value": 1, "sleep": 120,
                                                    "out": {str(tmp_path / "long.json")!r}}})])
        """)
    script = tmp_path / "parent.py"
    script.write_text(parent)
    process = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while not workers:  # the worker is the parent's child running multiprocessing's spawn_main
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
            workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _child_of(p, process.pid)]
        time.sleep(1.0)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its killed parent"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _child_of(proc: Path, parent: int) -> bool:
    try:
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]) == parent and b"spawn_main" in (proc / "cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
        return False
