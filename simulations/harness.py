"""Run Phalanx's ServerApp and ClientApp as one federation, on one of two engines.

* ``engine="inprocess"`` (the default): :mod:`simulations.inprocess` calls the ClientApp in this
  process through a Flower Grid, every message through Flower's wire form. No engine to start:
  a run costs its rounds.
* ``engine="ray"``: Flower's simulation engine, the one behind ``flwr run`` (``flwr-simulation``
  calls the same ``_run_simulation``), driven directly so that an experiment needs no SuperLink
  process, starts and stops Ray itself (or joins a running Ray cluster, ``ray_address``), and
  leaves nothing running when it returns. Clients run in Ray actors, two at once on two cores.

For a fixed seed both engines give the same per-round numbers (tests/test_inprocess_engine.py):
the ClientApp seeds its own training, the server's global RNG is not shared with clients on
either engine, and both hand partitions to nodes in ascending node-id order, so the strategy
(which orders replies by node id) stacks the same rows in the same order.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
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

#: The engines a federation can run on.
ENGINES = ("inprocess", "ray")
#: The engine of ``simulations run``/``sweep`` and :func:`run_federation` unless told otherwise.
DEFAULT_ENGINE = "inprocess"


def project_dir() -> Path:
    """The Flower App's directory (the one holding pyproject.toml)."""
    return Path(__file__).resolve().parent.parent


def default_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the project: every run-config key with its default."""
    from flwr.common.config import get_project_config

    return dict(get_project_config(project_dir())["tool"]["flwr"]["app"]["config"])


def check_engine(engine: str) -> str:
    """Return ``engine`` if it is one of :data:`ENGINES`; a ValueError names it otherwise."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {list(ENGINES)}")
    return engine


def run_federation(overrides: dict[str, Any], *, engine: str = DEFAULT_ENGINE, verbose: bool = False,
                   progress: Any = None, ray_address: str | None = None) -> dict:
    """Run one federated training and return its summary.

    Parameters
    ----------
    overrides : dict
        Run-config keys (dash-case) that differ from the defaults; ``out`` says where the run
        directory goes.
    engine : str
        ``"inprocess"`` or ``"ray"`` (:data:`ENGINES`).
    verbose : bool
        Show Flower's and Ray's own logs too.
    progress : object or None
        Told about the rounds as they go (:class:`simulations.progress.RoundProgress`).
    ray_address : str or None
        With ``engine="ray"``: the address of a running Ray cluster to join (``"auto"``, or
        ``"HOST:6379"``) instead of starting Ray in this process.

    Returns
    -------
    dict
        The run's ``summary.json``, with ``wall_seconds`` and ``engine`` (which engine ran it,
        and for the in-process engine what the wire form cost and the seconds spent in clients).
    """
    from flwr.common.config import get_fused_config_from_dir

    check_engine(engine)
    run_config = get_fused_config_from_dir(project_dir(), dict(overrides))  # refuses unknown keys
    out = Path(str(run_config["out"])).expanduser().resolve()
    summary_path = out / "summary.json"
    if summary_path.exists() and not run_config.get("resume", False):
        summary_path.unlink()
    started = time.time()
    engine_report = simulate(dict(overrides) | {"out": str(out)}, engine=engine, verbose=verbose, progress=progress,
                             ray_address=ray_address)
    if not summary_path.exists():
        raise RuntimeError(f"the run wrote no {summary_path}: see the log above for the ServerApp's error")
    summary = json.loads(summary_path.read_text())
    summary["wall_seconds"] = time.time() - started
    summary["engine"] = engine_report
    from server.run import write_json

    write_json(summary_path, summary)  # strict JSON, atomically
    return summary


def simulate(overrides: dict[str, Any], *, server_app=None, engine: str = DEFAULT_ENGINE, verbose: bool = False,
             progress: Any = None, ray_address: str | None = None, wire: bool = True) -> dict[str, Any]:
    """Run the ClientApp with ``server_app`` (default: Phalanx's ServerApp) on an engine.

    Parameters
    ----------
    overrides : dict
        Run-config keys that differ from the defaults (unknown keys are refused).
    server_app : flwr.serverapp.ServerApp | None
        Another ServerApp object to drive the same clients (benchmarks compare against Flower's
        own strategies this way); None runs ``server.app``'s ``app``.
    engine, verbose, progress, ray_address
        As for :func:`run_federation`.
    wire : bool
        In-process engine: send messages through Flower's wire form (off only to measure its cost).

    Returns
    -------
    dict
        ``{"name": engine, ...}``: for the in-process engine also ``wire`` (messages, bytes,
        seconds) and ``client_seconds``.
    """
    os.environ.update(OFFLINE_ENV)
    from flwr.common.config import get_fused_config_from_dir

    check_engine(engine)
    app_dir = project_dir()
    run_config = get_fused_config_from_dir(app_dir, dict(overrides))
    if server_app is None:
        # Handed over as an object, not as "server.app:app": by name, Flower parses server/app.py
        # in the ServerApp thread while the simulation engine parses client/app.py, and two
        # concurrent ast.parse calls can fail on CPython 3.11 ("AST constructor recursion depth
        # mismatch", seen once in CI).
        from server.app import app as server_app
    if engine == "inprocess":
        return _simulate_inprocess(server_app, run_config, dict(overrides), app_dir, progress=progress, wire=wire)
    with _watch_rounds(Path(str(run_config["out"])).expanduser() / "summary.json", progress):
        _simulate_ray(server_app, run_config, dict(overrides), app_dir, verbose=verbose, ray_address=ray_address)
    return {"name": "ray", "ray_address": ray_address}


def _simulate_inprocess(server_app, run_config: dict[str, Any], overrides: dict[str, Any], app_dir: Path, *,
                        progress: Any, wire: bool) -> dict[str, Any]:
    from client.app import app as client_app
    from simulations.inprocess import run_inprocess

    on_reply = None
    if progress is not None:
        def on_reply(instruction, reply, index, batch_size) -> None:
            if not instruction.metadata.message_type.startswith("train"):
                return
            try:  # the round is in the train config Phalanx's strategy sends; no round, no progress
                server_round = int(instruction.content["config"]["server-round"])
            except (KeyError, TypeError, ValueError):
                return
            progress.client_done(server_round, index + 1, batch_size)

    grid = run_inprocess(server_app, client_app, run_config, num_nodes=int(run_config["num-clients"]),
                         seed=int(run_config["seed"]), app_dir=str(app_dir), override_config=overrides, wire=wire,
                         on_reply=on_reply)
    return {"name": "inprocess", "wire": grid.stats.as_dict() if wire else None,
            "client_seconds": grid.client_seconds}


def ray_backend_config(*, ray_address: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """The simulation engine's backend config: one CPU per client actor, a GPU share when present.

    Parameters
    ----------
    ray_address : str or None
        Join this running Ray cluster (``ray.init(address=...)``): the cluster decides the CPUs,
        so none are claimed here. None: the cluster in ``RAY_ADDRESS`` when that is set (Ray's
        own convention), else a local Ray started with this machine's cores.
    verbose : bool
        Ray's own INFO logs and its workers' output in this process.
    """
    init_args: dict[str, Any] = {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}
    ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    # One CPU per client actor: on a 2-core machine two clients train at once.
    return {"client_resources": {"num_cpus": 1, "num_gpus": _gpu_share()}, "init_args": init_args}


def _simulate_ray(server_app, run_config: dict[str, Any], overrides: dict[str, Any], app_dir: Path, *,
                  verbose: bool, ray_address: str | None) -> None:
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run_id = secrets.randbits(63)
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(overrides)
    # What flwr-simulation sets for a run it was not handed by a SuperLink.
    run.primary_task_id = secrets.randbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with partitions_in_node_id_order():
        _run_simulation(
            num_supernodes=int(run_config["num-clients"]),
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app_attr="client.app:app",
            server_app=server_app,
            server_app_attr=None,
            server_app_context=context,
            app_dir=str(app_dir),
            run=run,
            backend_config=ray_backend_config(ray_address=ray_address, verbose=verbose),
            verbose_logging=verbose,
            is_app=True,
        )


@contextlib.contextmanager
def partitions_in_node_id_order() -> Iterator[None]:
    """While active, Flower's simulation engine gives partition ``i`` to its ``i``-th smallest node id.

    Flower registers its nodes with random ids and hands out partitions in registration order,
    so the order of the partitions by node id, which is the order in which Phalanx's strategy
    stacks the replies, changes from run to run. Order-dependent float sums (the mean, ALIE's
    honest mean and deviation) then round differently, and a client sample with
    ``fraction-train`` < 1 (drawn over the sorted ids) picks other partitions. The ids stay
    Flower's random ones; only which partition each id serves is chosen, as
    ``start_vce(existing_nodes_mapping=...)`` lets a caller choose it. The in-process engine
    uses the same order (:func:`simulations.inprocess.node_ids_for`).
    """
    from flwr.server.superlink.fleet.vce import vce_api

    register_nodes = vce_api._register_nodes  # pylint: disable=protected-access

    def register_in_id_order(num_nodes: int, state_factory) -> dict[int, int]:
        mapping = register_nodes(num_nodes=num_nodes, state_factory=state_factory)
        return {node_id: partition for partition, node_id in enumerate(sorted(mapping))}

    vce_api._register_nodes = register_in_id_order  # pylint: disable=protected-access
    try:
        yield
    finally:
        vce_api._register_nodes = register_nodes  # pylint: disable=protected-access


@contextlib.contextmanager
def _watch_rounds(summary_path: Path, progress: Any, interval: float = 0.25) -> Iterator[None]:
    """Tell ``progress`` how many rounds summary.json holds, as the Ray engine runs (it has no hook)."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        seen = 0
        while not stop.wait(interval):
            try:
                rounds = json.loads(summary_path.read_text()).get("rounds") or []
            except (OSError, ValueError):
                continue
            if len(rounds) > seen:
                seen = len(rounds)
                progress.round_done(int(rounds[-1]["round"]))

    watcher = threading.Thread(target=watch, name="phalanx-round-watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


@dataclass(frozen=True)
class LocalRayCluster:
    """A running one-node Ray cluster: the address drivers join and the directory of its session."""

    address: str
    temp_dir: Path

    @property
    def session_dir(self) -> Path:
        """The session's directory (its ``logs/`` hold one ``worker-*.out`` per worker process)."""
        return self.temp_dir / "session_latest"


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int | None = None, *, timeout: float = 90.0) -> Iterator[LocalRayCluster]:
    """Start a one-node Ray cluster (``ray start --head --block``) and stop it again.

    The same cluster a multi-machine setup starts on its head node (docs/scaling.md), on this
    machine: every port is a free one and the session lives in its own temporary directory, so
    it shares nothing with other Ray instances here. It is stopped by ending the process group of
    the ``ray start`` it launched, never with ``ray stop``, which would stop every Ray on the
    machine.

    Parameters
    ----------
    num_cpus : int or None
        CPUs the node offers (default: this machine's).
    timeout : float
        Seconds to wait for the head to accept drivers.

    Yields
    ------
    LocalRayCluster
        Its ``address`` (``"127.0.0.1:PORT"``) is for ``run_federation(..., engine="ray",
        ray_address=...)``.

    Raises
    ------
    RuntimeError
        If the ``ray`` command is missing or the head does not come up in time (its log is quoted).
    """
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    if not Path(ray_cli).exists():
        raise RuntimeError("the `ray` command is missing: install flwr[simulation]")
    ports = _free_ports(8)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None)  # short: socket paths
    log_path = Path(temp_dir) / "ray-start.log"
    command = [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(ports[0]),
               "--num-cpus", str(num_cpus or os.cpu_count() or 1), "--include-dashboard", "false",
               "--disable-usage-stats", "--temp-dir", temp_dir, "--ray-client-server-port", str(ports[1]),
               "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
               "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
               "--node-manager-port", str(ports[6]), "--object-manager-port", str(ports[7])]
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | OFFLINE_ENV)
    address = f"127.0.0.1:{ports[0]}"
    try:
        deadline = time.monotonic() + timeout
        while "This command will now block" not in log_path.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`ray start --head` did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield LocalRayCluster(address, Path(temp_dir))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        _wait_for_group_exit(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_for_group_exit(group: int, timeout: float = 20.0) -> None:
    """Wait until no process of ``group`` is left (Ray's daemons exit after their parent); SIGKILL stragglers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.25)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def _gpu_share() -> float:
    """A quarter of a GPU per client when one is present (four clients share it), else none."""
    try:
        import torch

        return 0.25 if torch.cuda.is_available() else 0.0
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0.0
