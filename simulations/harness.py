"""Run Phalanx's ServerApp and ClientApp on Flower's simulation engine, in this process.

This is the engine behind ``flwr run`` (``flwr-simulation`` calls the same
``_run_simulation``), driven directly so that an experiment needs no SuperLink process, starts
and stops Ray itself, and leaves nothing running when it returns.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

#: Environment for offline runs: no runtime dependency installation, no telemetry.
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_DISABLE_USAGE_STATS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def project_dir() -> Path:
    """The Flower App's directory (the one holding pyproject.toml)."""
    return Path(__file__).resolve().parent.parent


def default_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the project: every run-config key with its default."""
    from flwr.common.config import get_project_config

    return dict(get_project_config(project_dir())["tool"]["flwr"]["app"]["config"])


def run_federation(overrides: dict[str, Any], *, verbose: bool = False) -> dict:
    """Run one federated training on the simulation engine and return its summary.

    Parameters
    ----------
    overrides : dict
        Run-config keys (dash-case) that differ from the defaults; ``out`` says where the run
        directory goes.
    verbose : bool
        Show Flower's and Ray's own logs too.

    Returns
    -------
    dict
        The run's ``summary.json``.
    """
    from flwr.common.config import get_fused_config_from_dir

    run_config = get_fused_config_from_dir(project_dir(), dict(overrides))  # refuses unknown keys
    out = Path(str(run_config["out"])).expanduser().resolve()
    summary_path = out / "summary.json"
    if summary_path.exists() and not run_config.get("resume", False):
        summary_path.unlink()
    started = time.time()
    simulate(dict(overrides) | {"out": str(out)}, verbose=verbose)
    if not summary_path.exists():
        raise RuntimeError(f"the run wrote no {summary_path}: see the log above for the ServerApp's error")
    summary = json.loads(summary_path.read_text())
    summary["wall_seconds"] = time.time() - started
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def simulate(overrides: dict[str, Any], *, server_app=None, verbose: bool = False) -> None:
    """Run the ClientApp with ``server_app`` (default: Phalanx's ServerApp) on the simulation engine.

    Parameters
    ----------
    overrides : dict
        Run-config keys that differ from the defaults (unknown keys are refused).
    server_app : flwr.serverapp.ServerApp | None
        Another ServerApp object to drive the same clients (benchmarks compare against Flower's
        own strategies this way); None runs ``server.app``'s ``app``.
    verbose : bool
        Show Flower's and Ray's own logs too.
    """
    os.environ.update(OFFLINE_ENV)
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    app_dir = project_dir()
    run_config = get_fused_config_from_dir(app_dir, dict(overrides))
    run_id = secrets.randbits(63)
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(overrides)
    # What flwr-simulation sets for a run it was not handed by a SuperLink.
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    backend_config = {
        # One CPU per client actor: on a 2-core machine two clients train at once.
        "client_resources": {"num_cpus": 1, "num_gpus": _gpu_share()},
        "init_args": {"num_cpus": os.cpu_count() or 1, "logging_level": "INFO" if verbose else "ERROR",
                      "log_to_driver": verbose},
    }
    if server_app is None:
        # Handed over as an object, not as "server.app:app": by name, Flower parses server/app.py
        # in the ServerApp thread while the simulation engine parses client/app.py, and two
        # concurrent ast.parse calls can fail on CPython 3.11 ("AST constructor recursion depth
        # mismatch", seen once in CI).
        from server.app import app as server_app
    _run_simulation(
        num_supernodes=int(run_config["num-clients"]),
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app_attr="client.app:app",
        server_app=server_app,
        server_app_attr=None,
        server_app_context=context,
        app_dir=str(app_dir),
        run=run,
        backend_config=backend_config,
        verbose_logging=verbose,
        is_app=True,
    )


def _gpu_share() -> float:
    """A quarter of a GPU per client when one is present (four clients share it), else none."""
    try:
        import torch

        return 0.25 if torch.cuda.is_available() else 0.0
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0.0
