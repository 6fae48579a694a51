"""Run Phalanx as a real Flower deployment: TLS, SuperNode authentication, one process per party.

Flower 1.42's deployment runtime is a SuperLink (one HTTPS port serving the Fleet, Control and
Runtime APIs) and one SuperNode per data owner. With ``--enable-supernode-auth`` the SuperLink
accepts only SuperNodes whose EC public key an operator registered with ``flwr supernode
register``; registration assigns the node id, and every Fleet request is signed with the node's
private key, so a node id cannot be claimed by anyone else. Reputation per node id (the server's
scoring and policies) relies on exactly that binding.

This module does it all on loopback for a test or a demonstration::

    python -m server.deployment local --nodes 2 --rounds 2 --workdir DIR

makes a throwaway CA, a server certificate for 127.0.0.1/localhost and the SuperNodes' key pairs
(with ``cryptography``; no openssl needed), starts ``flower-superlink`` with TLS and node
authentication on a free port, registers the keys, starts the SuperNodes, proves that a SuperNode
with an unregistered key is refused, runs the app with ``flwr run``, checks ``DIR/run/summary.json``
and stops every process it started, also on error. ``python -m server.deployment node-key NAME
--out DIR`` writes one SuperNode key pair for a real cluster (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import datetime
import ipaddress
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client.keyfiles import ensure_private_dir, write_private_file, write_public_file

#: The repository root: the Flower App ``flwr run`` builds (it holds pyproject.toml).
PROJECT_DIR = Path(__file__).resolve().parents[1]

#: Flower's long-running executables; each may spawn the next ones down.
FLOWER_PROCESS_NAMES = ("flower-superlink", "flower-supernode", "flower-superexec",
                        "flwr-serverapp", "flwr-clientapp", "flwr-simulation")

#: The name of the SuperLink connection written to ``FLWR_HOME/config.toml``.
CONNECTION_NAME = "phalanx-local"

LOOPBACK = "127.0.0.1"

#: What the SuperLink logs when a SuperNode's key is not registered (flwr 1.42, fleet_handlers.py).
UNREGISTERED_KEY_EVIDENCE = "No SuperNode found with the given public key"

_NODE_ID_LINE = re.compile(r"SuperNode ID: (-?\d+)")
_FLOWER_EXIT_LINE = re.compile(r"Exit Code: (\d+)")
_RUN_CONFIG_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
RunConfigValue = str | int | float | bool


class DeploymentError(RuntimeError):
    """A step of a deployment failed; the message names the step and quotes the logs."""


# --------------------------------------------------------------------------- key material


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a CA and of the server certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's key pair in OpenSSH format (what ``flower-supernode`` and ``flwr`` read)."""

    private_key: Path
    public_key: Path


def make_tls_files(directory: Path, hosts: Sequence[str] = (LOOPBACK, "localhost"),
                   valid_for: datetime.timedelta = datetime.timedelta(days=1)) -> TlsFiles:
    """Create a throwaway CA and a server certificate for ``hosts``, both P-384 ECDSA.

    The material is throwaway: each call replaces what is in ``directory``. Every file is written
    as a new file renamed into place, so a symlink planted at one of the paths is replaced, never
    followed, and ``server.key`` is ``0600`` from creation on, whatever mode an old file had.

    Parameters
    ----------
    directory : Path
        Where ``ca.crt``, ``server.pem`` and ``server.key`` are written; created if absent and made
        ``0700`` (it must be owned by this user and not be a symlink).
    hosts : Sequence[str]
        Subject alternative names of the server certificate: IP addresses and DNS names.
    valid_for : datetime.timedelta
        Validity of both certificates from now (back-dated five minutes for clock skew).

    Returns
    -------
    TlsFiles
        The three files. The CA's private key is never written: nothing else can be signed by it.

    Raises
    ------
    client.keyfiles.UnsafePathError
        When ``directory`` is a symlink or owned by another user.
    """
    if not hosts:
        raise ValueError("make_tls_files: hosts is empty; the server certificate needs at least one SAN")
    ensure_private_dir(directory)
    not_before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    not_after = not_before + valid_for

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Phalanx throwaway CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(host) for host in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    write_public_file(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), overwrite=True)
    write_public_file(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), overwrite=True)
    write_private_file(files.server_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), overwrite=True)
    return files


def make_node_key(directory: Path, name: str, *, overwrite: bool = False) -> NodeKey:
    """Create a SuperNode's P-384 EC key pair: ``directory/name`` (0600) and ``directory/name.pub``.

    Flower 1.42 requires an EC key on a NIST curve; the private key is read by
    ``flower-supernode --auth-supernode-private-key`` and the public key by ``flwr supernode register``.

    Parameters
    ----------
    directory : Path
        Created ``0700`` if absent (an existing directory keeps its mode).
    name : str
        The key's file name.
    overwrite : bool, default False
        False: refuse when either file, or a symlink, is already there (a node key is an
        identity: overwriting it loses the registered node id). True: replace both atomically
        (throwaway keys); a symlink at either path is replaced, never followed.

    Raises
    ------
    FileExistsError
        Without ``overwrite``, when ``directory/name`` or ``directory/name.pub`` exists.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"make_node_key: name {name!r} must be letters, digits, '_', '.', '-' (it names files)")
    if not directory.exists():
        ensure_private_dir(directory)
    pair = NodeKey(directory / name, directory / f"{name}.pub")
    if not overwrite:
        for path in (pair.private_key, pair.public_key):
            if os.path.lexists(path):
                raise FileExistsError(f"{path} already exists (or is a symlink); refusing to overwrite a node key: "
                                      "remove it first, or pick another name")
    key = ec.generate_private_key(ec.SECP384R1())
    write_private_file(pair.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        overwrite=overwrite)
    write_public_file(pair.public_key, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode(),
        overwrite=overwrite)
    return pair


def public_key_pem(key: NodeKey) -> str:
    """The node's public key as PEM SubjectPublicKeyInfo: the form the SuperLink stores and logs."""
    public = serialization.load_ssh_public_key(key.public_key.read_bytes())
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


# --------------------------------------------------------------------------- ports, config


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago (the OS picks them).

    All sockets are held open together so the OS cannot hand out one port twice.
    """
    if count < 1:
        raise ValueError(f"free_ports: count must be >= 1, got {count}")
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_config_toml(run_config: Mapping[str, RunConfigValue]) -> str:
    """The run config as TOML for ``flwr run --run-config FILE.toml`` (no shell quoting involved).

    Raises
    ------
    ValueError
        A key that is not dash-case, or a value that is not str, int, float or bool.
    """
    lines = []
    for key, value in run_config.items():
        if not _RUN_CONFIG_KEY.match(key):
            raise ValueError(f"run config key {key!r} is not a dash-case name like 'num-clients'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            if math.isnan(value):
                text = "nan"
            elif math.isinf(value):
                text = "inf" if value > 0 else "-inf"
            else:
                text = repr(value)
        elif isinstance(value, str):
            # A JSON string is a valid TOML basic string (same escapes, and json.dumps never writes "\/").
            text = json.dumps(value)
        else:
            raise ValueError(f"run config {key!r}: {type(value).__name__} {value!r} is not a str, int, float or bool")
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def connection_toml(name: str, address: str, root_certificates: Path) -> str:
    """``FLWR_HOME/config.toml`` with one TLS SuperLink connection, the default."""
    return (f"[superlink]\ndefault = {json.dumps(name)}\n\n"
            f"[superlink.{name}]\naddress = {json.dumps(address)}\n"
            f"root-certificates = {json.dumps(str(root_certificates))}\n")


def flower_executable(name: str) -> Path:
    """A Flower console script next to the running interpreter (works in a venv without PATH)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DeploymentError(f"{name} not found next to {sys.executable}: install flwr into this environment")
    return path


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process this module starts.

    The interpreter's bin dir goes first on PATH: flower-superlink and flower-supernode start
    ``flower-superexec`` by its bare name, which starts ``flwr-serverapp``/``flwr-clientapp``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_")}
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessInfo:
    """A live process as /proc shows it."""

    pid: int
    ppid: int
    session: int
    cmdline: str


def list_processes() -> list[ProcessInfo]:
    """Every live (non-zombie) process, read from /proc."""
    if not Path("/proc/self/stat").exists():
        raise DeploymentError("process supervision reads /proc: server.deployment runs on Linux only")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # The command name in parentheses may contain spaces: split after its closing parenthesis.
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] == "Z":
            continue
        found.append(ProcessInfo(int(entry.name), int(fields[1]), int(fields[3]), cmdline))
    return found


def _is_flower(process: ProcessInfo) -> bool:
    return any(name in process.cmdline for name in FLOWER_PROCESS_NAMES)


def flower_processes(markers: Iterable[str]) -> list[ProcessInfo]:
    """Live Flower processes whose command line contains one of ``markers`` (a work dir, ``host:port``).

    A marker counts only as a whole path or address: ``127.0.0.1:4613`` does not match
    ``127.0.0.1:46135`` and ``/tmp/dep`` does not match ``/tmp/dep2``.
    """
    patterns = [re.compile(re.escape(m) + r"(?=$|[\s/'\"=,])") for m in markers if m]
    return [p for p in list_processes() if _is_flower(p) and any(pattern.search(p.cmdline) for pattern in patterns)]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the thread that started it dies.

    So a SuperLink or SuperNode does not outlive a test runner killed with SIGKILL, where no
    ``finally`` or atexit handler runs. Their SuperExecs watch their parent's pid and follow.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Supervisor:
    """Starts processes in their own sessions and stops all of them and everything they spawned.

    ``stop`` runs at interpreter exit too (atexit), and is idempotent. A started process also gets
    SIGTERM from the kernel if the thread that started it dies (call ``spawn`` from a thread that
    lives as long as the deployment, e.g. the main thread).

    Parameters
    ----------
    markers : list[str]
        Strings (the work dir, ``127.0.0.1:port``) that the command line of every Flower process of
        this deployment contains: the final sweep of ``stop`` finds processes that escaped the
        process tree (a detached ``flower-superexec`` whose parent died first) by them.
    grace : float
        Seconds between SIGTERM and SIGKILL.
    """

    markers: list[str] = field(default_factory=list)
    grace: float = 5.0
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        atexit.register(self.stop)

    def spawn(self, argv: Sequence[str | Path], log: Path, env: Mapping[str, str],
              cwd: Path | None = None) -> subprocess.Popen:
        """Start ``argv`` in a new session, stdout and stderr to ``log``."""
        with log.open("ab") as out:
            process = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True,
                                       preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop every started process and everything it spawned (see ``terminate``)."""
        terminate(self.processes, self.markers, self.grace)


def process_family(processes: Sequence[subprocess.Popen]) -> set[int]:
    """Live pids of ``processes`` (started with ``start_new_session``), their descendants and session members.

    A process counts by session alone (its parent already gone) only if it is a Flower process: a
    recycled pid of an exited process must not pull an unrelated session in.
    """
    table = list_processes()
    members = {p.pid for p in processes if p.poll() is None}
    sessions = {p.pid for p in processes}
    while True:
        grown = {p.pid for p in table
                 if p.ppid in members or (p.session in sessions and _is_flower(p))} - members
        if not grown:
            return members
        members |= grown
        # A child that detached into a session of its own (a SuperExec) takes its session along.
        sessions |= {p.session for p in table if p.pid in grown}


def terminate(processes: Sequence[subprocess.Popen], markers: Sequence[str] = (), grace: float = 5.0) -> None:
    """SIGTERM ``processes``, what they spawned and the Flower processes matching ``markers``.

    What is still alive ``grace`` seconds later gets SIGKILL.

    The family is read before any signal is sent: once a parent is gone its children are
    reparented and the tree no longer leads to them. Repeated (at most three times) because a
    process may spawn another while the rest shut down. The started processes are reaped.
    """
    for _ in range(3):
        targets = process_family(processes) | {p.pid for p in flower_processes(markers)}
        if not targets:
            break
        for pid in targets:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in targets):
            time.sleep(0.1)
        for pid in targets:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        for process in processes:
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass


# --------------------------------------------------------------------------- the deployment


@dataclass(frozen=True)
class RefusedNode:
    """Evidence that a SuperNode with an unregistered key was refused.

    Attributes
    ----------
    name : str
        The SuperNode's name in this deployment.
    exit_status : int
        Its process exit status (Flower exits 1 on every error).
    flower_exit_code : int | None
        The Flower exit code it logged (305: it could not connect to the SuperLink).
    superlink_evidence : str
        The SuperLink's log line refusing exactly this node's public key.
    """

    name: str
    exit_status: int
    flower_exit_code: int | None
    superlink_evidence: str


@dataclass(frozen=True)
class DeploymentReport:
    """What a local deployment did and measured."""

    workdir: Path
    run_dir: Path
    superlink_address: str
    node_ids: dict[str, int]
    summary: dict
    refused: RefusedNode | None
    markers: tuple[str, ...]


class LocalDeployment:
    """A SuperLink with TLS and SuperNode authentication and its SuperNodes, all on loopback.

    Use it as a context manager: leaving the block stops every process it started. The steps are
    methods so a caller can interleave its own checks; ``run_local_deployment`` runs them in order.

    Parameters
    ----------
    workdir : Path
        Holds everything: ``tls/``, ``keys/``, ``flwr-home/`` (FLWR_HOME), ``superlink/`` (its
        database), ``logs/`` and the run directory. The work directory and each of these is made
        ``0700`` (refused when it is a symlink or another user's): they hold private keys, the
        SuperLink's state and the run's records.
    project_dir : Path
        The Flower App to run (the repository by default).
    grace : float
        Seconds between SIGTERM and SIGKILL at shutdown.
    """

    def __init__(self, workdir: Path, project_dir: Path = PROJECT_DIR, grace: float = 5.0) -> None:
        if not (project_dir / "pyproject.toml").is_file():
            raise ValueError(f"{project_dir} is not a Flower App: it has no pyproject.toml")
        self.workdir = workdir.resolve()
        self.project_dir = project_dir.resolve()
        self.logs = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr-home"
        for path in (self.workdir, self.logs, self.flwr_home, self.workdir / "superlink", self.workdir / "keys"):
            ensure_private_dir(path)
        self.env = flower_environment(self.flwr_home)
        self.tls = make_tls_files(self.workdir / "tls")
        self.port = free_ports(1)[0]
        self.address = f"{LOOPBACK}:{self.port}"
        self.supervisor = Supervisor(markers=[str(self.workdir), self.address], grace=grace)
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[str, subprocess.Popen] = {}
        self.node_keys: dict[str, NodeKey] = {}
        # Where each SuperNode's latest start begins in its log (a restart appends to the same log).
        self._log_offsets: dict[str, int] = {}
        write_public_file(self.flwr_home / "config.toml",
                          connection_toml(CONNECTION_NAME, self.address, self.tls.ca_cert).encode(), overwrite=True)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def markers(self) -> list[str]:
        """What the command line of every process of this deployment contains (see ``flower_processes``)."""
        return list(self.supervisor.markers)

    def log(self, name: str) -> Path:
        """The log file of process ``name`` (``superlink``, a node name, ``flwr-run``)."""
        return self.logs / f"{name}.log"

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start ``flower-superlink`` with TLS and node authentication; return once it accepts connections."""
        if self.superlink is not None and self.superlink.poll() is None:
            raise DeploymentError("the SuperLink is already running")
        self.superlink = self.supervisor.spawn([
            flower_executable("flower-superlink"),
            "--ssl-ca-certfile", self.tls.ca_cert, "--ssl-certfile", self.tls.server_cert,
            "--ssl-keyfile", self.tls.server_key, "--enable-supernode-auth",
            "--host", LOOPBACK, "--port", str(self.port),
            # A database, not memory: registrations and so node ids survive a SuperLink restart.
            "--database", self.workdir / "superlink" / "state.db",
        ], self.log("superlink"), self.env, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not _accepts_connections(LOOPBACK, self.port):
            if self.superlink.poll() is not None:
                raise DeploymentError(f"flower-superlink exited with {self.superlink.returncode}:\n"
                                      f"{_tail(self.log('superlink'))}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"flower-superlink did not listen on {self.address} within {timeout:.0f} s:\n"
                                      f"{_tail(self.log('superlink'))}")
            time.sleep(0.2)

    def stop_superlink(self) -> None:
        """Stop the SuperLink and what it spawned (its SuperExec, a running ServerApp); nodes keep running."""
        if self.superlink is not None:
            terminate([self.superlink], grace=self.supervisor.grace)

    def register(self, key: NodeKey, timeout: float = 60.0) -> int:
        """Register a SuperNode's public key with ``flwr supernode register``; return its node id."""
        argv = [str(flower_executable("flwr")), "supernode", "register", str(key.public_key), CONNECTION_NAME,
                "--format", "json"]
        done = subprocess.run(argv, env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise DeploymentError(f"flwr supernode register {key.public_key} failed ({done.returncode}):\n"
                                  f"{done.stdout}{done.stderr}")
        try:
            reply = json.loads(done.stdout[done.stdout.index("{"):])
            return int(reply["node-id"])
        except (ValueError, KeyError) as err:
            raise DeploymentError(f"flwr supernode register printed no node id: {done.stdout!r}") from err

    def start_supernode(self, name: str, key: NodeKey, node_config: Mapping[str, RunConfigValue]) -> None:
        """Start ``flower-supernode`` ``name`` with its private key and node config (e.g. its partition)."""
        if name in self.supernodes and self.supernodes[name].poll() is None:
            raise DeploymentError(f"SuperNode {name!r} is already running")
        runtime_port = free_ports(1)[0]
        self.supervisor.markers.append(f"{LOOPBACK}:{runtime_port}")
        config = " ".join(line.replace(" = ", "=", 1) for line in run_config_toml(node_config).splitlines())
        log = self.log(name)
        self._log_offsets[name] = log.stat().st_size if log.exists() else 0
        self.node_keys[name] = key
        self.supernodes[name] = self.supervisor.spawn([
            flower_executable("flower-supernode"),
            "--superlink", self.address, "--root-certificates", self.tls.ca_cert,
            "--auth-supernode-private-key", key.private_key, "--node-config", config,
            # Each SuperNode serves its own Runtime API (for its ClientApp processes): one port each,
            # over TLS too (the loopback certificate fits), so its SuperExec and ClientApps are started
            # with --root-certificates under the work dir, which the process sweep recognises.
            "--host", LOOPBACK, "--port", str(runtime_port), "--ssl-certfile", self.tls.server_cert,
            "--ssl-keyfile", self.tls.server_key, "--ssl-ca-certfile", self.tls.ca_cert,
        ], log, self.env, cwd=self.workdir)

    def _new_log_text(self, name: str) -> str:
        with self.log(name).open("rb") as f:
            f.seek(self._log_offsets.get(name, 0))
            return f.read().decode(errors="replace")

    def wait_for_node_id(self, name: str, timeout: float = 60.0) -> int:
        """Wait until SuperNode ``name`` is activated; return the node id it logged."""
        process, log = self.supernodes[name], self.log(name)
        deadline = time.monotonic() + timeout
        while True:
            if match := _NODE_ID_LINE.search(self._new_log_text(name)):
                return int(match.group(1))
            if process.poll() is not None:
                raise DeploymentError(f"SuperNode {name!r} exited with {process.returncode} before it was "
                                      f"activated:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"SuperNode {name!r} was not activated within {timeout:.0f} s:\n{_tail(log)}")
            time.sleep(0.2)

    def wait_for_refusal(self, name: str, timeout: float = 60.0) -> RefusedNode:
        """Wait until SuperNode ``name`` (an unregistered key) exits refused; raise if it is accepted."""
        process, log = self.supernodes[name], self.log(name)
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if match := _NODE_ID_LINE.search(self._new_log_text(name)):
                raise DeploymentError(f"SuperNode {name!r} has an unregistered key but was accepted as node "
                                      f"{match.group(1)}: SuperNode authentication is not enforced")
            if time.monotonic() > deadline:
                raise DeploymentError(f"SuperNode {name!r} (unregistered key) neither exited nor was accepted "
                                      f"within {timeout:.0f} s:\n{_tail(log)}")
            time.sleep(0.2)
        # The SuperLink logs the refused key as PEM: its first base64 line identifies this node's key.
        key_line = public_key_pem(self.node_keys[name]).splitlines()[1]
        evidence = [line for line in self.log("superlink").read_text(errors="replace").splitlines()
                    if UNREGISTERED_KEY_EVIDENCE in line and key_line in line]
        if process.returncode == 0 or not evidence:
            raise DeploymentError(f"SuperNode {name!r} exited with {process.returncode} but the SuperLink logged no "
                                  f"'{UNREGISTERED_KEY_EVIDENCE}' for its key: it failed for another reason:\n"
                                  f"{_tail(log)}")
        logged = _FLOWER_EXIT_LINE.findall(self._new_log_text(name))
        return RefusedNode(name, process.returncode, int(logged[-1]) if logged else None, evidence[-1])

    def list_nodes(self, timeout: float = 60.0) -> dict[int, str]:
        """The SuperLink's registered nodes (``flwr supernode list``): node id -> status."""
        argv = [str(flower_executable("flwr")), "supernode", "list", CONNECTION_NAME, "--format", "json"]
        done = subprocess.run(argv, env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)
        try:
            reply = json.loads(done.stdout[done.stdout.index("{"):])
            return {int(node["node-id"]): node["status"] for node in reply["nodes"]}
        except (ValueError, KeyError) as err:
            raise DeploymentError(f"flwr supernode list failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                                  ) from err

    def run(self, run_config: Mapping[str, RunConfigValue], timeout: float = 600.0) -> int:
        """``flwr run . CONNECTION --stream --run-config FILE`` from the project dir; return its exit code."""
        config_file = self.workdir / "run-config.toml"
        write_public_file(config_file, run_config_toml(run_config).encode(), overwrite=True)
        process = self.supervisor.spawn([flower_executable("flwr"), "run", ".", CONNECTION_NAME, "--stream",
                                         "--run-config", config_file], self.log("flwr-run"), self.env,
                                        cwd=self.project_dir)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(f"flwr run did not finish within {timeout:.0f} s:\n{_tail(self.log('flwr-run'))}"
                                  ) from err

    def stop(self) -> None:
        """Stop every process this deployment started (and what they spawned)."""
        self.supervisor.stop()


def check_summary(summary: Mapping, rounds: int, node_ids: Iterable[int]) -> None:
    """Raise DeploymentError unless ``summary`` has ``rounds`` rounds, each accepting exactly ``node_ids``."""
    expected = sorted(int(n) for n in node_ids)
    records = summary.get("rounds", [])
    if [r.get("round") for r in records] != list(range(1, rounds + 1)):
        raise DeploymentError(f"summary has rounds {[r.get('round') for r in records]}, expected 1..{rounds}")
    for record in records:
        accepted = sorted(int(n) for n in record.get("accepted", []))
        if accepted != expected:
            raise DeploymentError(f"round {record['round']} accepted nodes {accepted}, expected the registered "
                                  f"nodes {expected}; rejected: {record.get('rejected')}")


def run_local_deployment(workdir: Path, num_nodes: int = 2, rounds: int = 2,
                         run_config: Mapping[str, RunConfigValue] | None = None, check_unregistered: bool = True,
                         project_dir: Path = PROJECT_DIR, timeout: float | None = None) -> DeploymentReport:
    """Run Phalanx across processes on loopback with TLS and SuperNode authentication; check; stop all.

    Parameters
    ----------
    workdir : Path
        Everything goes here (see ``LocalDeployment``); the run directory is ``workdir/run``.
    num_nodes : int
        Registered SuperNodes; node ``i`` holds partition ``i`` of ``num_nodes``.
    rounds : int
        Federated rounds.
    run_config : Mapping[str, RunConfigValue] | None
        Run-config overrides on top of the deployment's (num-clients, rounds, no attack, mean, out).
    check_unregistered : bool
        Also start a SuperNode with an unregistered key and require that it is refused.
    project_dir : Path
        The Flower App.
    timeout : float | None
        Seconds ``flwr run`` may take; default 120 + 60 per round.

    Returns
    -------
    DeploymentReport
        Node ids, the summary, and the refusal evidence. Every process is stopped on return and on error.

    Raises
    ------
    DeploymentError
        A step failed or the summary does not show ``rounds`` rounds of exactly the registered nodes.
    """
    if num_nodes < 1 or rounds < 1:
        raise ValueError(f"run_local_deployment: num_nodes and rounds must be >= 1, got {num_nodes} and {rounds}")
    workdir = workdir.resolve()
    run_dir = workdir / "run"
    config: dict[str, RunConfigValue] = {"num-clients": num_nodes, "num-malicious": 0, "attack": "none",
                                         "aggregator": "mean", "num-byzantine": 0, "rounds": rounds,
                                         "out": str(run_dir)}
    config.update(run_config or {})
    with LocalDeployment(workdir, project_dir=project_dir) as deployment:
        keys = {f"node-{i}": make_node_key(workdir / "keys", f"node-{i}", overwrite=True) for i in range(num_nodes)}
        deployment.start_superlink()
        node_ids = {name: deployment.register(key) for name, key in keys.items()}
        for i, (name, key) in enumerate(keys.items()):
            deployment.start_supernode(name, key, {"partition-id": i, "num-partitions": num_nodes})
        if check_unregistered:
            intruder = make_node_key(workdir / "keys", "unregistered", overwrite=True)
            deployment.start_supernode("unregistered", intruder, {"partition-id": 0, "num-partitions": num_nodes})
        for name, node_id in node_ids.items():
            if (logged := deployment.wait_for_node_id(name)) != node_id:
                raise DeploymentError(f"SuperNode {name} runs as node {logged}, but its key was registered "
                                      f"as {node_id}")
        refused = deployment.wait_for_refusal("unregistered") if check_unregistered else None

        code = deployment.run(config, timeout=timeout if timeout is not None else 120.0 + 60.0 * rounds)
        summary_file = run_dir / "summary.json"
        if code != 0 or not summary_file.is_file():
            raise DeploymentError(f"flwr run exited with {code}; {summary_file} "
                                  f"{'exists' if summary_file.is_file() else 'is missing'}:\n"
                                  f"{_tail(deployment.log('flwr-run'))}")
        summary = json.loads(summary_file.read_text())
        check_summary(summary, rounds, node_ids.values())
        return DeploymentReport(workdir, run_dir, deployment.address, node_ids, summary, refused,
                                tuple(deployment.markers))


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- CLI


def _parse_value(text: str) -> RunConfigValue:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_settings(pairs: Sequence[str]) -> dict[str, RunConfigValue]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set aggregator=median")
        settings[key] = _parse_value(value)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.deployment local|node-key ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m server.deployment", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="run a TLS + node-auth deployment on 127.0.0.1 and check it")
    local.add_argument("--nodes", type=int, default=2, help="registered SuperNodes (default 2)")
    local.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2)")
    local.add_argument("--workdir", type=Path, required=True, help="certificates, keys, FLWR_HOME, logs and run/")
    local.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a run-config override, repeatable (e.g. --set aggregator=median)")
    local.add_argument("--no-unregistered-check", action="store_true",
                       help="skip the SuperNode with an unregistered key")
    local.add_argument("--timeout", type=float, default=None, help="seconds flwr run may take")
    key = commands.add_parser("node-key", help="write a SuperNode key pair NAME and NAME.pub (P-384, OpenSSH)")
    key.add_argument("name")
    key.add_argument("--out", type=Path, default=Path("."), help="directory (default: .)")
    args = parser.parse_args(argv)

    if args.command == "node-key":
        try:
            pair = make_node_key(args.out, args.name)
        except (OSError, ValueError) as err:
            print(f"node-key failed: {err}", file=sys.stderr)
            return 1
        print(f"private key {pair.private_key} (keep it on the SuperNode)\npublic key  {pair.public_key} "
              f"(give it to the SuperLink operator: flwr supernode register {pair.public_key} <connection>)")
        return 0

    # SIGTERM/SIGHUP to this command unwind through the deployment's cleanup instead of skipping it.
    previous = {sig: signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
                for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        report = run_local_deployment(args.workdir, num_nodes=args.nodes, rounds=args.rounds,
                                      run_config=_parse_settings(args.set),
                                      check_unregistered=not args.no_unregistered_check, timeout=args.timeout)
    except (DeploymentError, ValueError) as err:
        print(f"deployment failed: {err}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"SuperLink {report.superlink_address} (TLS, SuperNode authentication)")
    for name, node_id in report.node_ids.items():
        print(f"  {name}: node id {node_id}")
    if report.refused is not None:
        print(f"  {report.refused.name} (unregistered key): refused, Flower exit code "
              f"{report.refused.flower_exit_code}; SuperLink: {UNREGISTERED_KEY_EVIDENCE}")
    for record in report.summary["rounds"]:
        print(f"round {record['round']}: accuracy {record['accuracy']:.4f}, accepted {record['accepted']}")
    print(f"run directory {report.run_dir}; all processes stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
