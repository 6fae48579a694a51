"""Shared fixtures: federations that several end-to-end specifications compare against."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (tests/test_aggregators_triton.py);
# it must be chosen before the kernels are defined (aggregators.order_stats_kernels, imported on
# the first launch).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: The defence keys that the defaults (the recommended recipe) set around the rule, at their plain
#: values: specifications about one rule alone, the monitor or DP use them.
PLAIN = {"pre-aggregation": "", "server-momentum": 0.0}

#: Digits, 10 IID clients, plain mean, no attacker, 10 rounds.
CLEAN_MEAN = PLAIN | {"aggregator": "mean", "num-byzantine": 0, "attack": "none", "num-malicious": 0, "rounds": 10}


@pytest.fixture(scope="session")
def clean_mean_run(tmp_path_factory) -> dict:
    """The no-attack reference run (one simulation shared by every test that needs it)."""
    # Imported here so that the aggregator tests run where Flower is not installed (a GPU box).
    from simulations.harness import run_federation

    return run_federation(CLEAN_MEAN | {"out": str(tmp_path_factory.mktemp("clean-mean") / "run")})


@pytest.fixture
def task_identity():
    """The ServerApp runtime sets the task identity that messages carry; tests that build
    Messages outside a runtime set the same."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def flwr_env(home: Path) -> dict[str, str]:
    """The environment for an offline ``flwr`` command with its own FLWR_HOME (stop it with
    ``stop_processes_mentioning(str(home))``)."""
    import sys

    bin_dir = Path(sys.executable).parent
    return os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def processes_mentioning(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def stop_processes_mentioning(marker: str, grace: float = 5.0) -> None:
    """SIGTERM every process whose command line mentions ``marker``, SIGKILL what is left after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_mentioning(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while processes_mentioning(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
